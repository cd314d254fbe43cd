"""Bar charts as inline SVG, drawn on the server (the console runs no script)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Bar:
    label: str
    value: float
    height: float  # px
    x: float
    title: str


@dataclass(frozen=True)
class Chart:
    bars: list[Bar]
    width: int
    height: int
    peak: float
    unit: str


def bar_chart(points: list[tuple[str, float]], unit: str, height: int = 160) -> Chart:
    """One bar per (label, value), scaled to the largest value."""
    step = 36
    peak = max((v for _, v in points), default=0.0)
    bars = [
        Bar(
            label=label,
            value=value,
            height=0 if peak <= 0 or value <= 0 else max(1.0, value / peak * (height - 30)),
            x=10 + i * step,
            title=f"{label}: {format_value(value, unit)}",
        )
        for i, (label, value) in enumerate(points)
    ]
    return Chart(
        bars=bars, width=max(200, 20 + step * len(points)), height=height, peak=peak, unit=unit
    )


def format_value(value: float, unit: str) -> str:
    if unit == "USD":
        return f"${value:,.6f}" if value < 0.01 else f"${value:,.2f}"
    return f"{int(value):,} {unit}"
