"""Soak: mixed streaming and plain requests through every tier for a bounded time, with
the resident memory of every process sampled. No request may fail and memory may not
grow past a stated bound once warm.

CI runs 60 s; `KIMI_SOAK_S=1800 pytest tests/integration/test_soak.py` runs longer.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time

import httpx
import pytest

from benchmarks.compare import MemorySampler

pytestmark = pytest.mark.integration

SOAK_S = float(os.environ.get("KIMI_SOAK_S", "60"))
# Allowed growth of the summed RSS between the first and the last quarter of the run.
GROWTH_BOUND = {"fraction": 0.15, "plus_mib": 256}
MODELS = ["kimi-k2.5:premium", "kimi-k2.5:standard", "kimi-k2.5:budget", "kimi-k2.5"]


def is_error_event(line: str) -> bool:
    """An error event, or a data line that is no chunk at all (a failure too; raising
    here would end the worker's thread without a record)."""
    payload = line.removeprefix("data: ")
    if payload == "[DONE]":
        return False
    try:
        event = json.loads(payload)
    except ValueError:
        return True
    return not isinstance(event, dict) or "error" in event


def test_soak_mixed_load_no_errors_and_bounded_memory(serve_url, admin, state_dir):
    key = admin.post("/admin/keys", json={"plan": "enterprise"}).json()["key"]
    results: list[tuple[int, str]] = []
    stop = threading.Event()

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(timeout=120, headers={"authorization": f"Bearer {key}"}) as c:
            while not stop.is_set():
                body = {
                    "model": rng.choice(MODELS),
                    "messages": [{"role": "user", "content": "soak " * rng.randint(1, 60)}],
                    "max_tokens": rng.randint(8, 96),
                    "stream": rng.random() < 0.7,
                }
                try:
                    if body["stream"]:
                        with c.stream("POST", f"{serve_url}/v1/chat/completions", json=body) as r:
                            raw = list(r.iter_lines())
                            lines = [ln for ln in raw if ln.startswith("data: ")]
                            # an error event, not a chunk whose text is "error"
                            errors = [ln for ln in lines if is_error_event(ln)]
                            ok = r.status_code == 200 and lines[-1:] == ["data: [DONE]"]
                            ok = ok and not errors
                            # a failure says what it was: the error event, or the body
                            what = "" if ok else (errors or ["\n".join(raw)])[0][:300]
                            results.append((r.status_code if ok else 599, body["model"] + what))
                    else:
                        r = c.post(f"{serve_url}/v1/chat/completions", json=body)
                        what = "" if r.status_code == 200 else r.text[:300]
                        results.append((r.status_code, body["model"] + what))
                except httpx.HTTPError as exc:
                    results.append((0, repr(exc)))

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(6)]
    with MemorySampler(interval=1.0) as mem:
        for t in threads:
            t.start()
        time.sleep(SOAK_S)
        stop.set()
        for t in threads:
            t.join(timeout=180)
    failures = [r for r in results if r[0] != 200]
    series = mem.series
    quarter = max(1, len(series) // 4)
    first = max(total for _, total in series[:quarter])
    last = max(total for _, total in series[-quarter:])
    bound = first * (1 + GROWTH_BOUND["fraction"]) + GROWTH_BOUND["plus_mib"] * 2**20
    figures = {
        "seconds": SOAK_S,
        "requests": len(results),
        "failures": len(failures),
        "first_quarter_peak_mib": round(first / 2**20),
        "last_quarter_peak_mib": round(last / 2**20),
        "bound_mib": round(bound / 2**20),
        **mem.report(),
    }
    (state_dir / "soak.json").write_text(json.dumps(figures, indent=2))
    print("soak:", json.dumps(figures))
    assert len(results) > SOAK_S  # it was load, not a trickle
    assert not failures, failures[:5]
    assert last <= bound, figures
