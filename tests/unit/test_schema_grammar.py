"""JSON schemas to GBNF for the GGUF tiers: the bounded-number rewrite (a property test:
every value the rewritten schema admits validates against the original) and the real
converter (`kimi-schema-grammar`, built by `make install`)."""

from __future__ import annotations

import asyncio

import jsonschema
import pytest
from hypothesis import given
from hypothesis import strategies as st

from deployments.engines.llama_cpp.schema_grammar import (
    SPACE_RULE,
    SchemaGrammar,
    SchemaNotSupported,
    bounded_numbers,
    tight_whitespace,
)

bound = st.one_of(
    st.none(),
    st.integers(-1000, 1000),
    st.decimals(-1000, 1000, places=3).map(float),
)


def admitted(schema: dict) -> list:
    """A sample of the values the rewritten schema admits."""
    if "enum" in schema:
        return schema["enum"]
    lo, hi = schema.get("minimum", -50), schema.get("maximum", 50)
    if lo > hi:
        return []
    return [lo, hi, (lo + hi) // 2]


@given(lo=bound, hi=bound, exlo=bound, exhi=bound)
def test_bounded_numbers_admit_only_valid_values(lo, hi, exlo, exhi):
    original = {"type": "number"}
    for key, value in (
        ("minimum", lo),
        ("maximum", hi),
        ("exclusiveMinimum", exlo),
        ("exclusiveMaximum", exhi),
    ):
        if value is not None:
            original[key] = value
    rewritten = bounded_numbers({"type": "object", "properties": {"x": original}})
    schema = rewritten["properties"]["x"]
    if schema == original:  # no bounds, or a range narrower than the finest grid
        return
    for value in admitted(schema):
        jsonschema.validate(value, original)


def test_bounded_number_examples():
    assert bounded_numbers({"type": "number", "minimum": 0, "maximum": 500}) == {
        "type": "integer",
        "minimum": 0,
        "maximum": 500,
    }
    assert bounded_numbers({"type": "number", "exclusiveMinimum": 0, "maximum": 0.3}) == {
        "enum": [0.1, 0.2, 0.3]
    }
    # values inside enum/const are data, not schemas
    data = {"enum": [{"type": "number", "minimum": 1}]}
    assert bounded_numbers(data) == data


def test_whitespace_is_at_most_one_space():
    grammar = 'a ::= "x"\nspace ::= | " " | "\\n"{1,2} [ \\t]{0,20}\n'
    assert tight_whitespace(grammar).splitlines() == ['a ::= "x"', SPACE_RULE]


def test_the_converter_bounds_strings_and_integers():
    schema = {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 24},
            "days": {"type": "integer", "minimum": 1, "maximum": 14},
        },
        "required": ["city", "days"],
        "additionalProperties": False,
    }
    rules = asyncio.run(SchemaGrammar().rules({"args-0": schema}))
    assert rules.rules == {"args-0": "args-0"}
    text = rules.grammar
    assert "char{0,24}" in text and SPACE_RULE in text.splitlines()
    assert 'args-0-days ::= ([1-9] | "1" [0-4])' in text


def test_a_schema_outside_the_converters_subset_is_refused():
    with pytest.raises(SchemaNotSupported):
        asyncio.run(SchemaGrammar().rules({"a": {"type": "object", "$ref": "#/nowhere"}}))
