"""JSON schemas to GBNF rules by llama.cpp's own converter (`kimi-schema-grammar`, built
beside llama-server by scripts/build_llama_cpp.sh), so a grammar we compose accepts what
llama.cpp's schema support accepts: bounded whitespace, no raw control characters in
strings, lengths, enums, numeric bounds, nested objects, arrays, `$ref`s."""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections import OrderedDict
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from deployments.artifacts.llama_cpp import llama_binary

log = logging.getLogger(__name__)

HELPER = "kimi-schema-grammar"
CACHE_SIZE = 256  # distinct tool sets kept converted; agents resend the same tools
SPACE_RULE = 'space ::= " "?'


class SchemaNotSupported(ValueError):
    """A schema outside llama.cpp's converter's subset."""


@dataclass(frozen=True)
class SchemaRules:
    grammar: str  # GBNF rules without a root
    rules: dict[str, str]  # schema name -> the rule that matches it


class SchemaGrammar:
    def __init__(self) -> None:
        self._cache: OrderedDict[str, SchemaRules] = OrderedDict()

    async def rules(self, schemas: dict[str, dict[str, Any]]) -> SchemaRules:
        """Rules for each named schema (names are valid GBNF rule names)."""
        key = json.dumps(schemas, sort_keys=True)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        result = await convert(schemas)
        self._cache[key] = result
        if len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        return result


async def convert(schemas: dict[str, dict[str, Any]]) -> SchemaRules:
    schemas = {name: bounded_numbers(schema) for name, schema in schemas.items()}
    proc = await asyncio.create_subprocess_exec(
        str(llama_binary(HELPER)),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate(json.dumps({"schemas": schemas}).encode())
    if proc.returncode != 0:
        message = err.decode(errors="replace").strip()[:500]
        if proc.returncode != 2:  # not a refusal but a crash: the schema still gets a 400
            log.error("%s exited with %s on %s: %s", HELPER, proc.returncode, schemas, message)
        raise SchemaNotSupported(message or f"{HELPER} exited with {proc.returncode}")
    data = json.loads(out)
    return SchemaRules(grammar=tight_whitespace(data["grammar"]), rules=data["rules"])


def tight_whitespace(grammar: str) -> str:
    """At most one space between JSON tokens (as vLLM's tier gets from xgrammar): the
    converter allows up to two newlines and 20 blanks, which a model gone astray spends
    its `max_tokens` on."""
    lines = [SPACE_RULE if line.startswith("space ::=") else line for line in grammar.splitlines()]
    return "\n".join(lines) + "\n"


NUMBER_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
DATA_KEYWORDS = frozenset({"enum", "const", "default", "examples"})  # values, not schemas
MAX_GRID = 100


def bounded_numbers(node: Any) -> Any:
    """llama.cpp's converter drops the bounds of a `number` (it keeps those of an
    `integer`), so a bounded number becomes the integers within its bounds or, when
    none lies there, the decimals of the coarsest grid that does (at most 100 values):
    values that always validate, at the price of finer fractions on these tiers."""
    if isinstance(node, list):
        return [bounded_numbers(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {k: v if k in DATA_KEYWORDS else bounded_numbers(v) for k, v in node.items()}
    if out.get("type") != "number" or not any(k in out for k in NUMBER_BOUNDS):
        return out
    rest = {k: v for k, v in out.items() if k not in NUMBER_BOUNDS and k != "type"}
    first, last = multiples_within(out, 1)
    if first is None or last is None or first <= last:
        bounds = {"minimum": first, "maximum": last}
        return {**rest, "type": "integer", **{k: v for k, v in bounds.items() if v is not None}}
    for digits in range(1, 7):
        first, last = multiples_within(out, 10**digits)
        assert first is not None and last is not None
        if first <= last:
            last = min(last, first + MAX_GRID - 1)
            return {
                **rest,
                "enum": [float(Decimal(k).scaleb(-digits)) for k in range(first, last + 1)],
            }
    return out  # a range narrower than 1e-6: left to the converter, unbounded


def multiples_within(schema: dict[str, Any], scale: int) -> tuple[int | None, int | None]:
    """The first and last k such that k / scale lies within the schema's bounds (None:
    no bound on that side). Decimal arithmetic: 0.3 * 10 must be 3, not 3.0000000000000004."""

    def scaled(key: str) -> Decimal | None:
        value = schema.get(key)
        if value is None or isinstance(value, bool):
            return None
        return Decimal(str(value)) * scale

    lows = [math.ceil(v) for v in [scaled("minimum")] if v is not None]
    lows += [math.floor(v) + 1 for v in [scaled("exclusiveMinimum")] if v is not None]
    highs = [math.floor(v) for v in [scaled("maximum")] if v is not None]
    highs += [math.ceil(v) - 1 for v in [scaled("exclusiveMaximum")] if v is not None]
    return (max(lows) if lows else None, min(highs) if highs else None)
