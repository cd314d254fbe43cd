"""Tool-call and JSON-schema accuracy per tier, in the spirit of Moonshot's K2 Vendor
Verifier: how often a forced call comes, parses and validates, on every tier.

    .venv/bin/python -m benchmarks.tool_calls [--repeats 2] [--tiers premium standard budget]

Each tier's engine runs in-process as its replica runs it (vLLM for premium, llama-server
for the GGUF tiers) and gets a fixed set of tool schemas (nested objects, enums, arrays,
bounded numbers, optional fields, several tools offered) with `tool_choice` auto,
required and named, streamed and not, thinking on and off; and bounded JSON-schema
answers. A call counts as valid when its arguments parse with strict `json.loads` and
validate against its tool's schema. The model has random weights, so the figures measure
the grammar, parser and sampling constraints alone. Results go to
benchmarks/results/tool_calls.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import jsonschema

from benchmarks.compare import tier_spec
from deployments.engines.base import Engine
from deployments.protocol import EngineError

RESULTS = Path(__file__).parent / "results"


def tool(name: str, parameters: dict[str, Any]) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "parameters": parameters}}


TOOLS = [
    tool(
        "get_weather",
        {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 24},
                "days": {"type": "integer", "minimum": 1, "maximum": 14},
                "units": {"type": "string", "enum": ["metric", "imperial"]},
            },
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    ),
    tool(
        "book_table",
        {
            "type": "object",
            "properties": {
                "party": {
                    "type": "object",
                    "properties": {
                        "size": {"type": "integer", "minimum": 1, "maximum": 12},
                        "names": {
                            "type": "array",
                            "items": {"type": "string", "maxLength": 8},
                            "maxItems": 3,
                        },
                    },
                    "required": ["size"],
                    "additionalProperties": False,
                },
                "time": {"type": "string", "pattern": "^[0-2][0-9]:[0-5][0-9]$"},
                "budget": {"type": "number", "minimum": 0, "maximum": 500},
            },
            "required": ["party", "time"],
            "additionalProperties": False,
        },
    ),
    tool(
        "set_flag",
        {
            "type": "object",
            "properties": {
                "on": {"type": "boolean"},
                "note": {"anyOf": [{"type": "string", "maxLength": 16}, {"type": "null"}]},
            },
            "required": ["on"],
            "additionalProperties": False,
        },
    ),
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ANSWER = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "population": {"type": "integer", "minimum": 0, "maximum": 1_000_000_000},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b"]}, "maxItems": 3},
    },
    "required": ["name", "population"],
    "additionalProperties": False,
}
CHOICES: dict[str, Any] = {
    "auto": "auto",
    "required": "required",
    "named": {"type": "function", "function": {"name": "book_table"}},
}


def case_body(kind: str, n: int, thinking: bool, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "seed": n,
        "stream": stream,
        "chat_template_kwargs": {"thinking": thinking},
    }
    if kind == "json_schema":
        response_format = {"name": "city", "schema": ANSWER, "strict": True}
        return {
            **body,
            "messages": [{"role": "user", "content": f"A city, as JSON {n}"}],
            "response_format": {"type": "json_schema", "json_schema": response_format},
            "max_tokens": 200,
        }
    return {
        **body,
        "messages": [{"role": "user", "content": f"Plan dinner {n}"}],
        "tools": TOOLS,
        "tool_choice": CHOICES[kind],
        "max_tokens": 400,
    }


def check_answer(content: str) -> tuple[bool, str]:
    try:
        jsonschema.validate(json.loads(content), ANSWER)
    except (ValueError, jsonschema.ValidationError) as exc:
        return False, f"{type(exc).__name__}: {content[:200]!r}"
    return True, ""


def check_call(call: dict[str, Any]) -> bool:
    try:
        jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])
    except (ValueError, KeyError, jsonschema.ValidationError):
        return False
    return True


async def answer(engine: Engine, body: dict[str, Any], rid: str) -> dict[str, Any]:
    """Content, calls and finish reason, from a streamed or a plain answer."""
    calls: dict[int, dict[str, Any]] = {}
    out: dict[str, Any] = {"content": "", "finish": None, "error": None}
    async for item in engine.chat(body, rid):
        if isinstance(item, EngineError):
            out["error"] = item.message
        elif isinstance(item, dict):
            choice = item["choices"][0]
            out["content"] = choice["message"].get("content") or ""
            out["finish"] = choice["finish_reason"]
            for i, c in enumerate(choice["message"].get("tool_calls") or []):
                calls[i] = {"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
        elif item.startswith("data: {"):
            for ch in json.loads(item[6:]).get("choices", []):
                out["finish"] = ch.get("finish_reason") or out["finish"]
                delta = ch.get("delta") or {}
                out["content"] += delta.get("content") or ""
                for tc in delta.get("tool_calls") or []:
                    c = calls.setdefault(tc["index"], {"name": None, "arguments": ""})
                    c["name"] = (tc.get("function") or {}).get("name") or c["name"]
                    c["arguments"] += (tc.get("function") or {}).get("arguments") or ""
    out["calls"] = [calls[i] for i in sorted(calls)]
    out["cut"] = cut_off(out)
    return out


def cut_off(out: dict[str, Any]) -> bool:
    """Whether `max_tokens` cut the turn's last call. A plain answer leaves such a call out;
    a stream has already sent its start, and its `length` says so (OpenAI's deltas carry
    no end of a call), so the last streamed call is dropped as clients must drop it."""
    if out["finish"] != "length" or not out["calls"]:
        return False
    try:
        json.loads(out["calls"][-1]["arguments"])
    except ValueError:
        out["calls"].pop()
        return True
    return False


async def run_tier(name: str, repeats: int) -> dict[str, Any]:
    spec = tier_spec(name)
    if spec.engine == "vllm":
        from deployments.engines.vllm.engine import VLLMEngine

        engine: Engine = VLLMEngine(spec)
    else:
        from deployments.engines.llama_cpp.engine import LlamaCppEngine

        engine = LlamaCppEngine(spec)
    await engine.start()
    rows: list[dict[str, Any]] = []
    started = time.monotonic()
    cases = [
        (kind, thinking, stream)
        for thinking in (True, False)
        for kind in [*CHOICES, "json_schema"]
        for stream in (False, True)
        for _ in range(repeats)
    ]
    try:
        for n, (kind, thinking, stream) in enumerate(cases):
            body = case_body(kind, n, thinking, stream)
            a = await answer(engine, body, f"bench-{name}-{n}")
            if kind == "json_schema":
                valid, detail = check_answer(a["content"])
            else:
                invalid = [c for c in a["calls"] if not check_call(c)]
                valid, detail = not invalid, (json.dumps(invalid[0]) if invalid else "")
            rows.append(
                {
                    "kind": kind if kind == "json_schema" else f"tool_choice={kind}",
                    "thinking": thinking,
                    "stream": stream,
                    "seed": n,
                    "calls": len(a["calls"]),
                    "valid": valid,
                    "finish": a["finish"],
                    "cut": a.get("cut", False),
                    "error": a["error"],
                    "detail": a["error"] or detail,
                }
            )
    finally:
        await engine.shutdown()
    summary = summarize(name, rows, time.monotonic() - started)
    # /v1/models shows these figures only for a tier serving this same artifact
    summary["artifact"] = spec.artifact.model_dump(mode="json")
    summary["quantization"] = spec.quantization_label
    return summary


def summarize(tier: str, rows: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    def share(selected: list[dict[str, Any]], ok) -> dict[str, Any]:
        good = sum(1 for r in selected if ok(r))
        return {"ok": good, "of": len(selected), "rate": round(good / max(len(selected), 1), 4)}

    forced = [r for r in rows if r["kind"] in ("tool_choice=required", "tool_choice=named")]
    auto = [r for r in rows if r["kind"] == "tool_choice=auto"]
    answers = [r for r in rows if r["kind"] == "json_schema"]
    return {
        "tier": tier,
        "forced_call_made": share(forced, lambda r: r["calls"] > 0),
        "forced_call_schema_valid": share(forced, lambda r: r["calls"] > 0 and r["valid"]),
        "auto_calls_schema_valid": share([r for r in auto if r["calls"]], lambda r: r["valid"]),
        "auto_turns_with_calls": share(auto, lambda r: r["calls"] > 0),
        "json_schema_valid": share(answers, lambda r: r["valid"]),
        "forced_turns_with_a_call_cut_off": share(forced, lambda r: r["cut"]),
        "finish_reasons": {
            kind: dict(Counter(str(r["finish"]) for r in rows if r["kind"] == kind))
            for kind in sorted({r["kind"] for r in rows})
        },
        "errors": sorted({r["error"] for r in rows if r["error"]}),
        "failures": [
            {k: r[k] for k in ("kind", "thinking", "stream", "seed", "finish", "detail")}
            for r in rows
            if not r["valid"] or r["error"]
        ],
        "requests": len(rows),
        "seconds": round(seconds, 1),
    }


def markdown(results: list[dict[str, Any]], command: str) -> str:
    def pct(s: dict[str, Any]) -> str:
        return f"{s['rate'] * 100:.0f} % ({s['ok']}/{s['of']})"

    lines = [
        "# Tool-call and JSON-schema accuracy per tier",
        "",
        f"`{command}`: forced = `tool_choice` required or named; thinking on and off,",
        "streamed and not; random-weight tiny model (the figures measure the constraints).",
        "",
        "| tier | forced call made | forced call schema-valid | JSON schema valid |"
        " auto turns with a call (valid) |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['tier']} | {pct(r['forced_call_made'])} | {pct(r['forced_call_schema_valid'])}"
            f" | {pct(r['json_schema_valid'])} | {pct(r['auto_turns_with_calls'])}"
            f" ({pct(r['auto_calls_schema_valid'])}) |"
        )
    lines += ["", "Finish reasons:", ""]
    for r in results:
        lines.append(f"- {r['tier']}: {json.dumps(r['finish_reasons'])}")
    lines += [
        "",
        "A forced turn may make several calls (`parallel_tool_calls`); where `max_tokens` cuts",
        "the last one (`length`), that call is left out (the plain answer leaves it out, and",
        "a client of the stream drops it on `length`) and the others count. Such turns:",
        "",
    ]
    for r in results:
        lines.append(f"- {r['tier']}: {pct(r['forced_turns_with_a_call_cut_off'])}")
    failures = [(r["tier"], f) for r in results for f in r["failures"]]
    lines += ["", f"Failures ({len(failures)}):", ""]
    lines += [f"- {tier}: {json.dumps(f)}" for tier, f in failures]
    return "\n".join(lines) + "\n"


async def main(tiers: list[str], repeats: int) -> None:
    results = [await run_tier(t, repeats) for t in tiers]
    command = f"python -m benchmarks.tool_calls --repeats {repeats} --tiers {' '.join(tiers)}"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "tool_calls.json").write_text(
        json.dumps({"command": command, "tiers": results}, indent=2) + "\n"
    )
    (RESULTS / "tool_calls.md").write_text(markdown(results, command))
    print(markdown(results, command))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--tiers", nargs="+", default=["premium", "standard", "budget"])
    args = parser.parse_args()
    asyncio.run(main(args.tiers, args.repeats))
