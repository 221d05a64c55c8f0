"""Charts as inline SVG text (no plotting library): line charts, bar charts and overlaid histograms, each with
labelled axes, ticks and a legend placed outside the plotting area. Every label is escaped here; the
returned text is trusted markup for the HTML templates (`templating.markup`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")


@dataclass(frozen=True)
class Frame:
    """The plotting area inside an SVG of `width` × `height`, with room for axes, labels and a legend row."""

    width: int = 640
    height: int = 260
    left: int = 64
    right: int = 16
    top: int = 34  # the legend row sits above the plot
    bottom: int = 46

    @property
    def plot_w(self) -> float:
        return self.width - self.left - self.right

    @property
    def plot_h(self) -> float:
        return self.height - self.top - self.bottom


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About `count` round tick values covering [low, high]."""
    if not math.isfinite(low) or not math.isfinite(high) or high <= low:
        return [low]
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.ceil(low / step - 1e-9) * step
    ticks = []
    value = first
    while value <= high + step * 1e-6:
        ticks.append(round(value, 12))
        value += step
    return ticks


def _label(value: float) -> str:
    return f"{value:.4g}"


def _svg(frame: Frame, body: list[str], title: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img" viewBox="0 0 {frame.width} {frame.height}" '
            f'width="{frame.width}" height="{frame.height}" font-family="sans-serif" font-size="11">'
            f"<title>{escape(title)}</title>{''.join(body)}</svg>")


def _axes(frame: Frame, xs: tuple[float, float], ys: tuple[float, float], xlabel: str, ylabel: str,
          *, xticks: bool = True) -> list[str]:
    """Axis lines, ticks with values and grid lines, and the two axis titles."""
    out = []
    x0, y0 = frame.left, frame.top + frame.plot_h
    out.append(f'<line x1="{x0}" y1="{frame.top}" x2="{x0}" y2="{y0}" stroke="#333"/>')
    out.append(f'<line x1="{x0}" y1="{y0}" x2="{x0 + frame.plot_w}" y2="{y0}" stroke="#333"/>')
    for tick in nice_ticks(*ys):
        y = y0 - (tick - ys[0]) / ((ys[1] - ys[0]) or 1) * frame.plot_h
        out.append(f'<line x1="{x0 - 4}" y1="{y:.1f}" x2="{x0 + frame.plot_w}" y2="{y:.1f}" stroke="#e4e4e4"/>')
        out.append(f'<text x="{x0 - 6}" y="{y + 4:.1f}" text-anchor="end">{_label(tick)}</text>')
    if xticks:
        for tick in nice_ticks(*xs, count=6):
            x = x0 + (tick - xs[0]) / ((xs[1] - xs[0]) or 1) * frame.plot_w
            out.append(f'<line x1="{x:.1f}" y1="{y0}" x2="{x:.1f}" y2="{y0 + 4}" stroke="#333"/>')
            out.append(f'<text x="{x:.1f}" y="{y0 + 16}" text-anchor="middle">{_label(tick)}</text>')
    out.append(f'<text x="{x0 + frame.plot_w / 2:.1f}" y="{frame.height - 6}" text-anchor="middle">{escape(xlabel)}</text>')
    out.append(f'<text transform="translate(14 {frame.top + frame.plot_h / 2:.1f}) rotate(-90)" '
               f'text-anchor="middle">{escape(ylabel)}</text>')
    return out


def _legend(frame: Frame, names: Sequence[str], colours: Sequence[str]) -> list[str]:
    """One row of swatches above the plotting area (never over the data)."""
    out, x = [], float(frame.left)
    for name, colour in zip(names, colours, strict=True):
        out.append(f'<rect x="{x:.1f}" y="8" width="12" height="12" fill="{colour}" fill-opacity="0.6" stroke="{colour}"/>')
        out.append(f'<text x="{x + 16:.1f}" y="18">{escape(name)}</text>')
        x += 28 + 6.5 * len(name)
    return out


def line_chart(series: dict[str, list[tuple[float, float]]], *, xlabel: str, ylabel: str, title: str,
               frame: Frame | None = None) -> str:
    """One polyline per series (e.g. the training loss of each phase against the step)."""
    frame = frame or Frame()
    points = [p for values in series.values() for p in values if math.isfinite(p[1])]
    if not points:
        return _svg(frame, [f'<text x="{frame.width / 2}" y="{frame.height / 2}" text-anchor="middle">no data</text>'], title)
    xs = (min(p[0] for p in points), max(p[0] for p in points))
    ys = (min(0.0, min(p[1] for p in points)), max(p[1] for p in points))
    ticks = nice_ticks(*ys)
    ys = (ys[0], max(ys[1], ticks[-1]))
    body = _axes(frame, xs, ys, xlabel, ylabel)
    colours = [PALETTE[i % len(PALETTE)] for i in range(len(series))]
    for (name, values), colour in zip(series.items(), colours, strict=True):
        coords = " ".join(f"{frame.left + (x - xs[0]) / ((xs[1] - xs[0]) or 1) * frame.plot_w:.1f},"
                          f"{frame.top + frame.plot_h - (y - ys[0]) / ((ys[1] - ys[0]) or 1) * frame.plot_h:.1f}"
                          for x, y in values if math.isfinite(y))
        body.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{coords}"><title>{escape(name)}'
                    "</title></polyline>")
    body += _legend(frame, list(series), colours)
    return _svg(frame, body, title)


def bar_chart(values: dict[str, int], *, title: str, colours: dict[str, str] | None = None, unit: str = "records",
              width: int = 640) -> str:
    """Horizontal bars, one per category, each labelled with its count (room kept for the longest label and count)."""
    row = 26
    left = 12 + int(6.5 * max((len(name) for name in values), default=4))
    room = 12 + 7 * max((len(str(v)) for v in values.values()), default=1)
    frame = Frame(width=width, height=row * max(1, len(values)) + 40, left=left, right=room, top=10, bottom=30)
    peak = max(values.values(), default=0) or 1
    ticks = nice_ticks(0, peak, 5)
    top_value = max(peak, ticks[-1])
    body = []
    y0 = frame.top + frame.plot_h
    for tick in ticks:
        x = left + tick / top_value * frame.plot_w
        body.append(f'<line x1="{x:.1f}" y1="{frame.top}" x2="{x:.1f}" y2="{y0}" stroke="#e4e4e4"/>')
        body.append(f'<text x="{x:.1f}" y="{y0 + 14}" text-anchor="middle">{_label(tick)}</text>')
    body.append(f'<text x="{left + frame.plot_w / 2:.1f}" y="{frame.height - 4}" text-anchor="middle">{escape(unit)}</text>')
    for i, (name, count) in enumerate(values.items()):
        y = frame.top + i * row + 4
        w = count / top_value * frame.plot_w
        colour = (colours or {}).get(name, PALETTE[i % len(PALETTE)])
        body.append(f'<text x="{left - 6}" y="{y + 13}" text-anchor="end">{escape(name)}</text>')
        body.append(f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{row - 8}" fill="{colour}"/>')
        body.append(f'<text x="{left + w + 4:.1f}" y="{y + 13}">{count}</text>')
    body.append(f'<line x1="{left}" y1="{frame.top}" x2="{left}" y2="{y0}" stroke="#333"/>')
    return _svg(frame, body, title)


def histogram(series: dict[str, Sequence[float]], marks: dict[str, float], *, xlabel: str, title: str,
              bins: int = 40, low: float | None = None, high: float = 1.0, colours: dict[str, str] | None = None) -> str:
    """Overlaid histograms of raw values (see `histogram_counts`)."""
    import numpy as np

    arrays = {name: np.asarray(v, dtype=np.float64) for name, v in series.items()}
    finite = {name: a[np.isfinite(a)] for name, a in arrays.items()}
    values = np.concatenate([a for a in finite.values() if len(a)] or [np.zeros(1)])
    start = float(min(values.min(), *marks.values())) if low is None else low
    edges = np.linspace(min(start, high - 1e-6), high, bins + 1)
    counts = {name: np.histogram(np.clip(a, edges[0], high), edges)[0].tolist() for name, a in finite.items()}
    return histogram_counts(edges.tolist(), counts, marks, xlabel=xlabel, title=title, colours=colours)


def histogram_counts(edges: Sequence[float], counts: dict[str, Sequence[int]], marks: dict[str, float], *, xlabel: str,
                     title: str, colours: dict[str, str] | None = None) -> str:
    """Overlaid histograms of binned counts (drawn as the share of each series per bin, so series of different
    sizes compare), with dashed vertical lines at `marks`, named in the legend row rather than on the bars."""
    frame = Frame(width=720, height=280, top=40)
    start, high = float(edges[0]), float(edges[-1])
    sizes = {name: sum(int(c) for c in values) for name, values in counts.items()}
    shares = {name: [int(c) / max(sizes[name], 1) for c in values] for name, values in counts.items()}
    peak = max((max(s) for s in shares.values() if len(s)), default=0.0) or 1.0
    ticks = nice_ticks(0, peak)
    peak = max(peak, ticks[-1])
    body = _axes(frame, (start, high), (0.0, peak), xlabel, "share of images")
    names = list(counts)
    palette = [(colours or {}).get(n, PALETTE[i % len(PALETTE)]) for i, n in enumerate(names)]
    scale = frame.plot_w / ((high - start) or 1.0)
    y0 = frame.top + frame.plot_h
    for (name, share), colour in zip(shares.items(), palette, strict=True):
        for i, value in enumerate(share):
            if value <= 0:
                continue
            x = frame.left + (edges[i] - start) * scale
            w = max(1.0, (edges[i + 1] - edges[i]) * scale - 0.5)
            h = value / peak * frame.plot_h
            body.append(f'<rect x="{x:.1f}" y="{y0 - h:.1f}" width="{w:.1f}" height="{h:.1f}" fill="{colour}" '
                        f'fill-opacity="0.45" stroke="{colour}" stroke-width="0.5">'
                        f"<title>{escape(name)}: {value:.1%} in [{edges[i]:.4f}, {edges[i + 1]:.4f})</title></rect>")
    dashes = ("6 3", "2 2", "8 2 2 2", "1 3")
    labels = [f"{n} (n={sizes[n]})" for n in names]
    legend = _legend(frame, labels, palette)
    x = frame.left + sum(28 + 6.5 * len(label) for label in labels)
    for j, (label, value) in enumerate(marks.items()):
        dash = dashes[j % len(dashes)]
        where = frame.left + (value - start) * scale
        body.append(f'<line x1="{where:.1f}" y1="{frame.top}" x2="{where:.1f}" y2="{y0}" stroke="#000" stroke-width="1.2" '
                    f'stroke-dasharray="{dash}"><title>{escape(label)} = {value:.4f}</title></line>')
        text = f"{label} threshold {value:.4f}"
        legend.append(f'<line x1="{x:.1f}" y1="14" x2="{x + 18:.1f}" y2="14" stroke="#000" stroke-width="1.2" '
                      f'stroke-dasharray="{dash}"/>')
        legend.append(f'<text x="{x + 22:.1f}" y="18">{escape(text)}</text>')
        x += 34 + 6.2 * len(text)
    return _svg(frame, body + legend, title)
