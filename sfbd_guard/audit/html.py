"""report.html: matched pairs side by side and similarity histograms, one self-contained file (PIL-drawn PNGs).

Originals appear only as thumbnails of flagged matches (copy or suspect), and not at all with
`--no-thumbnails`; unflagged rows show the sample and the matched record id only.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from ..contracts.audit_summary import AuditSummary

COLOURS = {"samples": (214, 39, 40), "holdout": (31, 119, 180)}
VERDICT_COLOURS = {"copy": "#d62728", "suspect": "#ff7f0e", "novel": "#2ca02c"}


@dataclass(frozen=True)
class Pair:
    sample: str
    sample_pixels: np.ndarray  # uint8 (C, H, W) at the prepared resolution
    record_id: str | None
    original: np.ndarray | None  # uint8 (C, H, W), only for flagged matches with thumbnails on
    s1: float
    margin: float
    l2_ratio: float
    verdict: str


def png_data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def thumbnail(pixels: np.ndarray, size: int) -> Image.Image:
    """uint8 (C, H, W) → a size×size PIL image (nearest neighbour, so pixels stay visible)."""
    array = pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0)
    return Image.fromarray(np.ascontiguousarray(array)).resize((size, size), Image.Resampling.NEAREST)


def histogram(series: dict[str, np.ndarray], marks: dict[str, float], *, width: int = 640, height: int = 240,
              bins: int = 50) -> Image.Image:
    """Overlaid normalised histograms of top-1 similarity, with vertical lines at the thresholds."""
    values = np.concatenate([v for v in series.values() if len(v)] or [np.zeros(1)])
    low = float(min(values.min(), *marks.values(), 0.9)) if marks else float(values.min())
    edges = np.linspace(low, 1.0, bins + 1)
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    left, bottom, top = 40, height - 30, 20
    scale_x = (width - left - 10) / (1.0 - low if low < 1.0 else 1.0)
    counts = {name: np.histogram(np.clip(v, low, 1.0), edges)[0] / max(len(v), 1) for name, v in series.items()}
    peak = max((c.max() for c in counts.values() if len(c)), default=1.0) or 1.0
    for name, count in counts.items():
        for i, share in enumerate(count):
            x0, x1 = left + (edges[i] - low) * scale_x, left + (edges[i + 1] - low) * scale_x
            y = bottom - (bottom - top) * share / peak
            draw.rectangle((x0, y, x1, bottom), outline=COLOURS.get(name, (0, 0, 0)))
    for label, value in marks.items():
        x = left + (value - low) * scale_x
        draw.line((x, top, x, bottom), fill=(0, 0, 0), width=1)
        draw.text((x + 2, top - 14 if label == "copy" else top), label, fill=(0, 0, 0))
    draw.line((left, bottom, width - 10, bottom), fill=(0, 0, 0))
    draw.text((left, bottom + 6), f"{low:.3f}", fill=(0, 0, 0))
    draw.text((width - 40, bottom + 6), "1.000", fill=(0, 0, 0))
    draw.text((width // 2 - 110, bottom + 6), "top-1 cosine similarity to the protected set", fill=(0, 0, 0))
    for i, name in enumerate(series):
        draw.text((width - 200, top + 14 * i), f"{name} (n={len(series[name])})", fill=COLOURS.get(name, (0, 0, 0)))
    return image


def _pair_row(pair: Pair, size: int) -> str:
    sample = f'<img src="{png_data_uri(thumbnail(pair.sample_pixels, size))}" alt="sample">'
    original = (f'<img src="{png_data_uri(thumbnail(pair.original, size))}" alt="protected original">'
                if pair.original is not None else '<span class="none">not shown</span>')
    colour = VERDICT_COLOURS.get(pair.verdict, "#000")
    return (f"<tr><td>{sample}<br>{html.escape(pair.sample)}</td>"
            f"<td>{original}<br>{html.escape(pair.record_id or '-')}</td>"
            f'<td style="color:{colour}"><b>{pair.verdict}</b></td><td>{pair.s1:.4f}</td><td>{pair.margin:.4f}</td>'
            f"<td>{pair.l2_ratio:.3f}</td></tr>")


def render(summary: AuditSummary, pairs: list[Pair], histogram_png: Image.Image, thumb_size: int) -> str:
    """The whole report.html as a string."""
    counts, th = summary.counts, summary.thresholds
    rows = "\n".join(_pair_row(p, thumb_size) for p in pairs) or '<tr><td colspan="6">no samples</td></tr>'
    warnings = "".join(f'<p style="color:#b35900">warning: {html.escape(w)}</p>' for w in summary.warnings)
    count_text = ", ".join(f"{k}: {counts.get(k, 0)}" for k in ("copy", "suspect", "novel", "error"))
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>guard audit: {html.escape(summary.samples)}</title>
<style>body{{font-family:sans-serif;margin:2em}} td{{padding:4px 10px;vertical-align:top;font-size:13px}}
img{{image-rendering:pixelated;border:1px solid #ccc}} .none{{color:#999}}</style></head><body>
<h1>guard audit</h1>
<p>samples <code>{html.escape(summary.samples)}</code> against the protected records of
<code>{html.escape(summary.prepared.path)}</code> ({summary.references} originals),
embedder <b>{html.escape(summary.embedder.kind)}</b>.</p>
<p><b>{count_text}</b>. Flagged (copy or suspect): {summary.flagged.fraction:.4f}
(95% CI {summary.flagged.ci95[0]:.4f}-{summary.flagged.ci95[1]:.4f}).</p>
<p>Thresholds ({html.escape(th.method)}): copy s1 &ge; {th.copy_:.4f}; suspect s1 &ge; {th.suspect:.4f}
or relative L2 ratio &le; {th.ratio:.4f}. {html.escape(th.note)}. {html.escape(th.expected_fpr_text)}.</p>
{warnings}
<h2>Top-1 similarity: samples versus holdout</h2>
<img src="{png_data_uri(histogram_png)}" alt="histograms">
<h2>Top matched pairs</h2>
<table><tr><th>sample</th><th>nearest protected</th><th>verdict</th><th>s1</th><th>margin</th><th>L2 ratio</th></tr>
{rows}
</table></body></html>
"""
