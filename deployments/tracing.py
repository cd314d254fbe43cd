"""OpenTelemetry traces for the router and the tier replicas, off by default.

`KIMI_SERVE_TRACES` picks the exporter in every process of the app (Ray workers inherit
it from `ray start`): `off` (default), `console`, `otlp` (the OTLP/HTTP exporter, set up
by the standard `OTEL_EXPORTER_OTLP_*` variables) or `file:/path.jsonl` (one JSON span a
line; for tests and air-gapped debugging). The trace context crosses the Ray hop from
router to tier as a W3C `traceparent` carried with the call.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)

_configured = False
_lock = threading.Lock()


class JsonLinesExporter(SpanExporter):
    def __init__(self, path: str) -> None:
        self.path = path

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            self._write(spans)
        except OSError:  # a full or read-only disk loses traces, never requests
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def _write(self, spans: Sequence[ReadableSpan]) -> None:
        with _lock, open(self.path, "a") as f:
            for s in spans:
                ctx = s.get_span_context()
                parent = s.parent.span_id if s.parent else None
                f.write(json.dumps({
                    "name": s.name, "trace_id": f"{ctx.trace_id:032x}",
                    "span_id": f"{ctx.span_id:016x}",
                    "parent_id": f"{parent:016x}" if parent else None,
                    "service": s.resource.attributes.get("service.name"),
                    "attributes": dict(s.attributes or {}),
                    "start_ns": s.start_time, "end_ns": s.end_time,
                }) + "\n")  # fmt: skip


def tracer(service: str) -> trace.Tracer:
    """The process's tracer; the provider is set up once from `KIMI_SERVE_TRACES`."""
    global _configured
    mode = os.environ.get("KIMI_SERVE_TRACES", "off")
    if not _configured and mode != "off":
        provider = TracerProvider(resource=Resource.create({"service.name": service}))
        exporter: SpanExporter
        if mode == "console":
            exporter = ConsoleSpanExporter()
        elif mode == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter()
        elif mode.startswith("file:"):
            exporter = JsonLinesExporter(mode[len("file:") :])
        else:
            raise ValueError(f"KIMI_SERVE_TRACES={mode!r}: use off, console, otlp or file:PATH")
        batch = mode == "otlp"  # a network exporter batches; local ones write at once
        provider.add_span_processor(
            BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter)
        )
        trace.set_tracer_provider(provider)
    _configured = True
    return trace.get_tracer(service)


def inject() -> dict[str, str]:
    """The current trace context, to send with a call to another process."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


def extract(carrier: dict[str, Any] | None) -> Any:
    return propagate.extract(carrier or {})
