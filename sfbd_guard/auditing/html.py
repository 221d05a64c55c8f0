"""report.html of an audit: which rule fired for every flagged sample, the thresholds in words next to their
formulas with each rule's false-positive rate on the holdout, a warning block when they are uncalibrated, the
similarity histogram (SVG, from summary.json's binned counts) and the top matched pairs side by side. Rendered
from templates/audit.html.j2 with autoescaping (sample names are hostile input). similarity.png, the same
histogram as a picture of its own, is drawn with PIL.

Originals appear only as thumbnails of flagged matches (copy or suspect), and not at all with
`--no-thumbnails`; unflagged rows show the sample and the matched record id only, and say why no original is shown.
The page links (relative to its folder) to its evidence: summary.json, samples.parquet, every flagged sample file,
and the run's compliance report (`guard run` writes it as report.html in the run directory).
"""

from __future__ import annotations

import base64
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
from PIL import Image, ImageDraw

from ..charts import histogram_counts, nice_ticks
from ..contracts.audit_summary import AuditSummary
from ..rundir import AUDIT_SUMMARY, AUDIT_TABLE, RunPaths
from ..templating import markup
from ..templating import render as render_template

COLOURS = {"samples": (214, 39, 40), "holdout": (31, 119, 180)}
HEX = {"samples": "#d62728", "holdout": "#1f77b4"}


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
    rules: list[str] = field(default_factory=list)  # the rules that fired (checks.RULES)
    mirror: bool = False  # a variant (mirror, rotation, inversion), not the image itself, gave the top-1 match
    transform: str = "identity"  # that variant (symmetry.Variant.name)


def png_data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def thumbnail(pixels: np.ndarray, size: int) -> Image.Image:
    """uint8 (C, H, W) → a size×size PIL image (nearest neighbour, so pixels stay visible)."""
    array = pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0)
    return Image.fromarray(np.ascontiguousarray(array)).resize((size, size), Image.Resampling.NEAREST)


def histogram(series: dict[str, np.ndarray], marks: dict[str, float], *, width: int = 640, height: int = 280,
              bins: int = 50) -> Image.Image:
    """similarity.png: overlaid normalised histograms of top-1 similarity with a y axis (share of images), the
    thresholds as vertical lines, and the legend in a row above the plot (never over the bars)."""
    values = np.concatenate([v for v in series.values() if len(v)] or [np.zeros(1)])
    low = float(min(values.min(), *marks.values(), 0.9)) if marks else float(values.min())
    low = min(low, 1.0 - 1e-6)
    edges = np.linspace(low, 1.0, bins + 1)
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 56, width - 12, 40, height - 42
    scale_x = (right - left) / (1.0 - low)
    counts = {name: np.histogram(np.clip(v, low, 1.0), edges)[0] / max(len(v), 1) for name, v in series.items()}
    peak = max((float(c.max()) for c in counts.values() if len(c)), default=1.0) or 1.0

    ticks = nice_ticks(0.0, peak, 4)
    peak = max(peak, ticks[-1])
    for tick in ticks:  # y axis: share of images
        y = bottom - (bottom - top) * tick / peak
        draw.line((left - 4, y, right, y), fill=(225, 225, 225) if tick else (0, 0, 0))
        draw.text((4, y - 6), f"{tick:.0%}" if peak >= 0.1 else f"{tick:.1%}", fill=(0, 0, 0))
    for name, count in counts.items():
        for i, share in enumerate(count):
            x0, x1 = left + (edges[i] - low) * scale_x, left + (edges[i + 1] - low) * scale_x
            y = bottom - (bottom - top) * share / peak
            if share > 0:
                draw.rectangle((x0, y, x1, bottom), outline=COLOURS.get(name, (0, 0, 0)))
    draw.line((left, top, left, bottom), fill=(0, 0, 0))
    legend_x = left
    for name in series:
        draw.rectangle((legend_x, 8, legend_x + 10, 18), outline=COLOURS.get(name, (0, 0, 0)), width=2)
        text = f"{name} (n={len(series[name])})"
        draw.text((legend_x + 14, 7), text, fill=COLOURS.get(name, (0, 0, 0)))
        legend_x += 24 + 6 * len(text)
    for label, value in marks.items():
        x = left + (value - low) * scale_x
        for y in range(top, bottom, 6):  # dashed
            draw.line((x, y, x, min(y + 3, bottom)), fill=(0, 0, 0))
        text = f"| {label} {value:.4f}"
        draw.text((legend_x, 7), text, fill=(0, 0, 0))
        legend_x += 12 + 6 * len(text)
        draw.text((x - 3, bottom + 2), "^", fill=(0, 0, 0))
    draw.text((left, bottom + 14), f"{low:.3f}", fill=(0, 0, 0))
    draw.text((right - 30, bottom + 14), "1.000", fill=(0, 0, 0))
    draw.text((width // 2 - 120, bottom + 26), "top-1 cosine similarity to the protected set", fill=(0, 0, 0))
    draw.text((4, top - 16), "share of images", fill=(0, 0, 0))
    return image


def rule_words(rules: list[str], transform: str, summary: AuditSummary) -> list[str]:
    """What fired for one sample, in words with the numbers (checks.RULES names); `transform`: the variant of the
    sample that matched (symmetry.Variant.name)."""
    th = summary.thresholds
    flip = f" (of its variant {transform})" if transform != "identity" else ""
    minimum = th.ratio_min_similarity
    words = {
        "hash": "exact copy (byte-identical pixels)",
        "s1>=copy": f"similarity{flip} ≥ copy threshold {th.copy_:.4f}",
        "s1>=suspect": f"similarity{flip} ≥ suspect threshold {th.suspect:.4f}",
        "l2_ratio<=ratio": f"L2 ratio ≤ {th.ratio:.4f}" + (f" with similarity ≥ {minimum:.4f}" if minimum is not None else ""),
    }
    shown = [words.get(r, r) for r in rules]
    if "s1>=copy" in rules and "s1>=suspect" in rules:  # the copy rule implies the suspect one
        shown.remove(words["s1>=suspect"])
    return shown


def _rule_rows(summary: AuditSummary) -> list[dict[str, Any]]:
    """The rules with their formula, what they mean, the bound on their false-positive rate and (calibrated) the
    rate measured on the holdout."""
    th = summary.thresholds
    bound, measured = th.expected_fpr, (th.holdout or {}).get("holdout_exceedance") or {}
    minimum = th.ratio_min_similarity
    where = "" if minimum is None else f" and s1 ≥ {minimum:.4f}"
    min_words = ("" if minimum is None else
                 f", and it is at least as similar to the protected set as {_quantile_words(th.ratio_min_quantile)}")
    return [
        {"verdict": "copy", "formula": "pixels identical (sha256)", "words": "the sample is a protected record, pixel for pixel",
         "bound": 0.0, "measured": None},
        {"verdict": "copy", "formula": f"s1 ≥ {th.copy_:.4f}",
         "words": f"its nearest protected image (s1: cosine similarity of the {summary.embedder.kind} embeddings; with the "
                  f"variants the transforms make, listed above) is as close as {_tail_words(th.method, th.alpha_copy)}",
         "bound": bound.get("copy"), "measured": measured.get("copy")},
        {"verdict": "suspect", "formula": f"s1 ≥ {th.suspect:.4f}",
         "words": f"as close as {_tail_words(th.method, th.alpha_suspect)}",
         "bound": bound.get("suspect_similarity"), "measured": measured.get("suspect_similarity")},
        {"verdict": "suspect", "formula": f"d₁ / mean(d₁…d_k) ≤ {th.ratio:.4f}{where}",
         "words": "in pixels (RMS distance d), it is much closer to its nearest protected image than to the next ones "
                  f"(Carlini et al.'s test; 0.5 = twice as close){min_words}",
         "bound": bound.get("suspect_ratio"), "measured": measured.get("suspect_ratio")},
    ]


def _tail_words(method: str, alpha: float) -> str:
    if method == "holdout":
        return f"at most {alpha:.2%} of real images the model never saw (the holdout)"
    return "the documented default for this embedder (uncalibrated: the share of unseen images this close is unknown)"


def _quantile_words(quantile: float | None) -> str:
    if quantile is None:
        return "the documented default"
    return f"the holdout's {'median' if quantile == 0.5 else f'{quantile:.0%} quantile'} image"


def similarity_chart(summary: AuditSummary) -> Any:
    """The similarity histogram as trusted SVG markup, from summary.json's binned counts (None for summaries
    written before them)."""

    hist = summary.similarity.get("histogram")
    if not isinstance(hist, dict):  # a summary written before the binned counts
        return None
    th = summary.thresholds
    return markup(histogram_counts(hist["edges"], {"samples": hist["samples"], "holdout": hist["holdout"]},
                                   {"copy": th.copy_, "suspect": th.suspect}, colours=HEX,
                                   xlabel="top-1 cosine similarity to the protected set (s1)",
                                   title="similarity of samples and holdout to the protected set"))


def not_shown_reason(pair: Pair, summary: AuditSummary) -> str:
    """Why the pairs table shows no original next to a sample, in words."""
    if pair.record_id is None:
        return "no protected image matched"
    if summary.thumbnails.startswith("off"):
        return "thumbnails are off (--no-thumbnails)"
    if summary.thumbnails.startswith("unavailable"):
        return f"the original could not be read ({summary.thumbnails.removeprefix('unavailable: ')})"
    if pair.verdict == "novel":
        return "the sample is novel, and originals are shown for flagged matches only"
    return "the original could not be read"


@dataclass(frozen=True)
class Evidence:
    """Where the page's links point, relative to the page's folder (None: not there)."""

    compliance_report: str | None
    summary: str
    samples_table: str
    samples: dict[str, str]  # flagged sample name -> link to its file


def relative_link(target: Path, page_dir: Path) -> str:
    """A URL-quoted link from a page in `page_dir` to `target` (hostile names stay one path)."""
    return quote(Path(os.path.relpath(target, page_dir)).as_posix())


def evidence_links(report: Path, samples: Path, flagged: list[str]) -> Evidence:
    """The links of an audit page written to `report`/report.html: its run's compliance report (report.html in the
    run directory, when the report folder sits in one), summary.json, samples.parquet, the flagged sample files."""
    report, samples = report.resolve(), samples.resolve()
    run = report.parent
    compliance = relative_link(RunPaths(run).report, report) if RunPaths(run).record.is_file() else None
    return Evidence(compliance, AUDIT_SUMMARY, AUDIT_TABLE,
                    {name: relative_link(samples / name, report) for name in flagged})


def _pair_view(pair: Pair, size: int, summary: AuditSummary, evidence: Evidence | None) -> dict[str, Any]:

    href = evidence.samples.get(pair.sample) if evidence else None
    return {"sample": pair.sample, "href": href, "record_id": pair.record_id or "–", "verdict": pair.verdict, "s1": pair.s1,
            "margin": pair.margin, "l2_ratio": pair.l2_ratio, "rules": rule_words(pair.rules, pair.transform, summary),
            "sample_src": markup(png_data_uri(thumbnail(pair.sample_pixels, size))),
            "original_src": markup(png_data_uri(thumbnail(pair.original, size))) if pair.original is not None else None,
            "why": not_shown_reason(pair, summary)}


def render(summary: AuditSummary, pairs: list[Pair], thumb_size: int, evidence: Evidence | None = None,
           flagged: list[tuple[str, str, str | None]] | None = None) -> str:
    """The whole report.html as a string; `flagged`: (sample name, verdict, nearest record id) of every flagged
    sample, each linked through `evidence`."""

    rows = [{"sample": name, "verdict": verdict, "record_id": record or "–",
             "href": evidence.samples.get(name) if evidence else None} for name, verdict, record in flagged or []]
    return render_template("sfbd_guard.auditing", "audit.html.j2", s=summary, th=summary.thresholds, evidence=evidence,
                           flagged=rows, pairs=[_pair_view(p, thumb_size, summary, evidence) for p in pairs],
                           rules=_rule_rows(summary),
                           histogram=similarity_chart(summary), calibrated=summary.thresholds.method == "holdout")
