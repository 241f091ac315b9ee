"""Plain SVG charts for the benchmarks, drawn by hand (no plotting library): a canvas of fixed
size, linear scales with round ticks, y axes with grid lines, bars, points, dashed target lines
and a legend. The output is a small text file that docs/*.md embed and that diffs readably."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

INK = "#24292f"
MUTED = "#57606a"
GRID = "#d8dee4"
TARGET = "#cf222e"
COLORS = ("#1f883d", "#0969da", "#bf8700", "#8250df", "#bc4c00", "#8b949e")
FONT_SIZE = 12
CHAR_WIDTH = 0.5  # average glyph width / font size of sans-serif, to lay out text
BOLD = 1.15  # how much wider bold text is


def nice_step(span: float, count: int) -> float:
    """A round step (1, 2, 2.5 or 5 times a power of ten) cutting `span` in about `count`."""
    raw = span / max(count, 1)
    power = 10.0 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw * (1 - 1e-9))


@dataclass(frozen=True)
class Scale:
    """Values lo..hi mapped linearly onto pixels start..end (on a y axis end < start)."""

    lo: float
    hi: float
    start: float
    end: float
    step: float

    @classmethod
    def fitted(cls, lo: float, hi: float, start: float, end: float, ticks: int = 5) -> Scale:
        """lo..hi widened to multiples of a round step that cuts it in about `ticks`."""
        hi = hi if hi > lo else lo + 1
        step = nice_step(hi - lo, ticks)
        return cls(math.floor(lo / step + 1e-9) * step, math.ceil(hi / step - 1e-9) * step,
                   start, end, step)

    def __call__(self, value: float) -> float:
        return self.start + (value - self.lo) / (self.hi - self.lo) * (self.end - self.start)

    def ticks(self) -> list[float]:
        count = round((self.hi - self.lo) / self.step)
        return [round(self.lo + k * self.step, 9) for k in range(count + 1)]


def spread(centre: float, width: float, count: int, gap: float = 9) -> list[float]:
    """x of `count` points side by side around `centre`, at most `gap` apart, within `width`."""
    if count < 2:
        return [centre] * count
    step = min(gap, width / (count - 1))
    return [centre + (k - (count - 1) / 2) * step for k in range(count)]


def text_width(text: str, size: float = FONT_SIZE) -> float:
    return len(text) * size * CHAR_WIDTH


def _title(tip: str) -> str:
    return f"<title>{escape(tip)}</title>" if tip else ""


def _class(kind: str) -> str:
    return f" class={quoteattr(kind)}" if kind else ""


class Chart:
    """An SVG canvas that elements are added to, in drawing order. `kind` becomes an element's
    class (to find the points of a series in the file); `tip` its tooltip."""

    def __init__(self, width: float, height: float, title: str = "") -> None:
        self.width, self.height = width, height
        self.parts: list[str] = []
        if title:
            self.text(16, 22, title, size=15, weight="bold")

    def text(self, x: float, y: float, text: str, *, anchor: str = "start",
             size: float = FONT_SIZE, color: str = INK, weight: str = "", rotate: float = 0,
             kind: str = "") -> None:
        extra = (f' font-size="{size:g}"' if size != FONT_SIZE else "") \
            + (f' fill="{color}"' if color != INK else "") \
            + (f' font-weight="{weight}"' if weight else "") \
            + (f' text-anchor="{anchor}"' if anchor != "start" else "") \
            + (f' transform="rotate({rotate:g} {x:.1f} {y:.1f})"' if rotate else "")
        self.parts.append(f'<text x="{x:.1f}" y="{y:.1f}"{extra}{_class(kind)}>'
                          f"{escape(text)}</text>")

    def line(self, x1: float, y1: float, x2: float, y2: float, *, color: str = INK,
             width: float = 1, dash: str = "", kind: str = "", tip: str = "") -> None:
        extra = f' stroke-dasharray="{dash}"' if dash else ""
        self.parts.append(f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" '
                          f'stroke="{color}" stroke-width="{width:g}"{extra}{_class(kind)}>'
                          f"{_title(tip)}</line>")

    def rect(self, x: float, y: float, width: float, height: float, *, color: str,
             kind: str = "", tip: str = "") -> None:
        self.parts.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{width:.1f}" '
                          f'height="{height:.1f}" fill="{color}"{_class(kind)}>'
                          f"{_title(tip)}</rect>")

    def bar(self, x: float, width: float, scale: Scale, value: float, *, color: str,
            label: str, kind: str = "", tip: str = "") -> None:
        """A bar from the scale's base up to `value`, with `label` above it."""
        top = scale(value)
        self.rect(x, top, width, scale(scale.lo) - top, color=color, kind=kind, tip=tip)
        self.text(x + width / 2, top - 3, label, anchor="middle", size=10)

    def dot(self, x: float, y: float, *, color: str, kind: str = "", tip: str = "") -> None:
        self.parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="{color}" '
                          f'fill-opacity="0.8" stroke="{color}"{_class(kind)}>'
                          f"{_title(tip)}</circle>")

    def triangle(self, x: float, y: float, *, color: str, kind: str = "",
                 tip: str = "") -> None:
        """A triangle pointing up, its base centred on (x, y + 4)."""
        self.parts.append(f'<path d="M{x - 5:.1f},{y + 4:.1f} L{x + 5:.1f},{y + 4:.1f} '
                          f'L{x:.1f},{y - 5:.1f} Z" fill="{color}"{_class(kind)}>'
                          f"{_title(tip)}</path>")

    def point(self, x: float, scale: Scale, value: float, *, color: str, kind: str = "",
              tip: str = "") -> None:
        """A dot at `value`; a value above the scale (or infinite) is a triangle at its top."""
        if value <= scale.hi:
            self.dot(x, scale(value), color=color, kind=kind, tip=tip)
        else:
            self.triangle(x, scale(scale.hi), color=color, kind=kind, tip=tip)

    def y_axis(self, scale: Scale, left: float, right: float, label: str) -> None:
        """Tick labels left of `left`, a grid line per tick to `right`, `label` turned up."""
        for tick in scale.ticks():
            y = scale(tick)
            self.line(left, y, right, y, color=GRID)
            self.text(left - 6, y + 4, f"{tick:g}", anchor="end", size=11, color=MUTED)
        self.line(left, scale.start, left, scale.end, color=MUTED)
        middle = (scale.start + scale.end) / 2
        self.text(left - 38, middle, label, anchor="middle", color=MUTED, rotate=-90)

    def target(self, scale: Scale, value: float, x1: float, x2: float, label: str,
               tip: str = "") -> None:
        """A dashed line at `value` from x1 to x2, `label` above its right end."""
        y = scale(value)
        self.line(x1, y, x2, y, color=TARGET, width=1.5, dash="6 4", kind="target",
                  tip=tip or label)
        self.text(x2, y - 4, label, anchor="end", size=10, color=TARGET)

    def legend(self, x: float, y: float, entries: list[tuple[str, str, str]]) -> None:
        """(shape, colour, label) in rows from (x, y), wrapped at the right edge (the chart
        grows down if needed); shape is box, dot, triangle or dash."""
        left = x
        for shape, color, label in entries:
            width = 22 + text_width(label) + 14
            if x > left and x + width > self.width:
                x, y = left, y + 20
            self._legend_mark(shape, x, y, color)
            self.text(x + 22, y + 4, label)
            x += width
        self.height = max(self.height, y + 16)

    def _legend_mark(self, shape: str, x: float, y: float, color: str) -> None:
        if shape == "box":
            self.rect(x + 4, y - 5, 10, 10, color=color)
        elif shape == "dash":
            self.line(x, y, x + 18, y, color=color, width=1.5, dash="6 4")
        elif shape == "triangle":
            self.triangle(x + 9, y, color=color)
        else:
            self.dot(x + 9, y, color=color)

    def svg(self) -> str:
        return "\n".join([f'<svg xmlns="http://www.w3.org/2000/svg" width="{self.width:.0f}" '
                          f'height="{self.height:.0f}" viewBox="0 0 {self.width:.0f} '
                          f'{self.height:.0f}" font-family="sans-serif" '
                          f'font-size="{FONT_SIZE}">',
                          f'<rect width="{self.width:.0f}" height="{self.height:.0f}" '
                          'fill="white"/>', *self.parts, "</svg>", ""])

    def write(self, path: Path) -> None:
        path.write_text(self.svg())
