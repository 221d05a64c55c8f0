"""`guard audit` end to end on tiny CelebA-layout data: verdicts, exit codes, report files, ledger, inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from helpers import celeba_policy, plant_samples, read_events, write_policy
from sfbd_guard.curation.prepare import prepare
from sfbd_guard.datasets.celeba import CelebAReader
from sfbd_guard.policy.model import load_policy


@pytest.fixture(scope="module")
def prepared(celeba_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 synthetic CelebA images at 16 px: train (32) → 10 clean by identity + 22 protected; valid/test = 8."""
    tmp = tmp_path_factory.mktemp("audit-prepared")
    return prepare(load_policy(write_policy(tmp / "p.yaml", celeba_policy(celeba_root, tmp / "prepared")))).output


def _audit(cli, tmp_path: Path, samples: Path, prepared: Path, *extra: object):  # type: ignore[no-untyped-def]
    return cli("audit", "--samples", samples, "--data", prepared, "--report", tmp_path / "report",
               "--index-cache", tmp_path / "cache", *extra)


def _rows(tmp_path: Path) -> dict[str, dict]:
    return {r["sample"]: r for r in pq.read_table(tmp_path / "report" / "samples.parquet").to_pylist()}


def _assert_one_line_error(result, *fragments: str, code: int = 2) -> None:  # type: ignore[no-untyped-def]
    assert result.code == code, (result.out, result.err)
    lines = result.err.strip().splitlines()
    assert 1 <= len(lines) <= 2 and lines[0].startswith("error: ") and "Traceback" not in result.err, result.err
    for fragment in fragments:
        assert fragment in result.err, result.err


def test_planted_copies_are_found_and_exit_3(cli, tmp_path: Path, prepared: Path) -> None:  # type: ignore[no-untyped-def]
    planted = plant_samples(prepared, tmp_path / "samples", copies=3, novel=6)
    result = _audit(cli, tmp_path, tmp_path / "samples", prepared)
    assert result.code == 3, result.err
    rows = _rows(tmp_path)
    assert len(rows) == 9
    for name, source in planted.items():
        assert rows[name]["verdict"] == "copy" and rows[name]["top1_record_id"] == source
        assert rows[name]["s1"] == pytest.approx(1.0, abs=1e-5) and rows[name]["hash_match"]
        assert rows[name]["l2_nearest"] == pytest.approx(0.0, abs=1e-6) and rows[name]["l2_ratio"] == 0.0
        assert rows[name]["topk_record_ids"][0] == source and len(rows[name]["topk_record_ids"]) == 10
    novel = [r for n, r in rows.items() if n.startswith("novel")]
    assert all(r["verdict"] == "novel" and not r["hash_match"] for r in novel)
    assert all(r["margin"] == pytest.approx(r["topk_similarities"][0] - r["topk_similarities"][1]) for r in rows.values())
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["counts"] == {"copy": 3, "suspect": 0, "novel": 6, "error": 0}
    assert summary["flagged"]["fraction"] == pytest.approx(3 / 9)
    assert summary["flagged"]["ci95"][0] < 3 / 9 < summary["flagged"]["ci95"][1]
    assert summary["thresholds"]["method"] == "holdout" and summary["thresholds"]["holdout"]["count"] == 8
    assert summary["embedder"]["kind"] == "pixel" and summary["index"]["cache"] == "built"
    assert "3 " in result.out and "copy" in result.out


def test_report_html_and_ledger_event(cli, tmp_path: Path, prepared: Path) -> None:  # type: ignore[no-untyped-def]
    plant_samples(prepared, tmp_path / "samples", copies=2, novel=3)
    assert _audit(cli, tmp_path, tmp_path / "samples", prepared, "--ledger", tmp_path / "ledger").code == 3
    page = (tmp_path / "report" / "report.html").read_text()
    assert page.count("data:image/png") == 5 + 2 and page.count("<svg") == 1  # 5 samples, 2 flagged originals; SVG histogram
    events = read_events(tmp_path / "ledger").to_pylist()
    assert [e["kind"] for e in events] == ["audit"] and events[0]["status"] == "ok"
    outputs = {Path(o["path"]).name: o["sha256"] for o in events[0]["outputs"]}
    from sfbd_guard.hashing import sha256_file

    assert outputs == {n: sha256_file(tmp_path / "report" / n) for n in ("samples.parquet", "summary.json", "report.html", "similarity.png")}
    inputs = {i["role"]: i for i in events[0]["inputs"]}
    assert inputs["prepared"]["sha256"] == json.loads((prepared / "card.json").read_text())["fingerprint"]
    assert inputs["samples"]["sha256"] and inputs["samples"]["path"] == "samples"  # relative to the project (the ledger's parent)
    summary = json.loads(events[0]["summary"])
    assert summary["counts"]["copy"] == 2 and summary["embedder"]["kind"] == "pixel" and "copy" in summary["thresholds"]


def test_no_thumbnails_writes_no_original(cli, tmp_path: Path, prepared: Path) -> None:  # type: ignore[no-untyped-def]
    plant_samples(prepared, tmp_path / "samples", copies=2, novel=3)
    assert _audit(cli, tmp_path, tmp_path / "samples", prepared, "--no-thumbnails").code == 3
    page = (tmp_path / "report" / "report.html").read_text()
    assert page.count("data:image/png") == 5 and "not shown" in page


def _links(page: Path) -> dict[str, Path]:
    """{link text: the file it points to} of every relative link on an HTML page, as a browser resolves them."""
    from html.parser import HTMLParser
    from urllib.parse import unquote

    found: dict[str, Path] = {}

    class Links(HTMLParser):
        href: str | None = None

        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            self.href = dict(attrs).get("href") if tag == "a" else None

        def handle_data(self, data: str) -> None:
            if self.href and not self.href.startswith("#") and data.strip():
                found[data.strip()] = (page.parent / unquote(self.href)).resolve()
            self.href = None

    Links().feed(page.read_text())
    return found


def test_the_page_links_its_evidence_and_says_why_no_original_is_shown(cli, tmp_path: Path, prepared: Path) -> None:  # type: ignore[no-untyped-def]
    planted = plant_samples(prepared, tmp_path / "samples", copies=2, novel=3)
    odd = "a b#?&<i>.png"  # a hostile file name stays one link to that file
    shutil.copy(tmp_path / "samples" / "copy-000.png", tmp_path / "samples" / odd)
    assert _audit(cli, tmp_path, tmp_path / "samples", prepared).code == 3
    page = tmp_path / "report" / "report.html"
    links = _links(page)
    assert links["summary.json"] == (tmp_path / "report" / "summary.json").resolve()
    assert links["samples.parquet"] == (tmp_path / "report" / "samples.parquet").resolve()
    for name in [*planted, odd]:  # every flagged sample links to its file
        assert links[name] == (tmp_path / "samples" / name).resolve() and links[name].is_file(), name
    assert not any(n.startswith("novel-") for n in links), "novel samples are not evidence"
    text = page.read_text()
    assert "<i>.png" not in text and text.count("not shown: the sample is novel") == 3
    assert "compliance report: not next to this audit" in text  # not in a run directory
    assert _audit(cli, tmp_path, tmp_path / "samples", prepared, "--no-thumbnails").code == 3
    assert page.read_text().count("not shown: thumbnails are off (--no-thumbnails)") == 6


def test_novel_only_exits_0(cli, tmp_path: Path, prepared: Path) -> None:  # type: ignore[no-untyped-def]
    plant_samples(prepared, tmp_path / "samples", copies=0, novel=4)
    result = _audit(cli, tmp_path, tmp_path / "samples", prepared)
    assert result.code == 0, result.err
    assert {r["verdict"] for r in _rows(tmp_path).values()} == {"novel"}


def test_mirrored_copy_needs_the_flip(cli, tmp_path: Path, prepared: Path) -> None:  # type: ignore[no-untyped-def]
    planted = plant_samples(prepared, tmp_path / "samples", copies=2, novel=2, transform=lambda x: x[..., ::-1].copy())
    assert _audit(cli, tmp_path, tmp_path / "samples", prepared).code == 3
    rows = _rows(tmp_path)
    assert all(rows[n]["verdict"] == "copy" and rows[n]["flipped"] and rows[n]["top1_record_id"] == s for n, s in planted.items())
    no_flip = write_policy(tmp_path / "noflip.yaml", {"embedder": {"flip": False}})
    assert _audit(cli, tmp_path, tmp_path / "samples", prepared, "--config", no_flip).code in (0, 3)
    assert all(_rows(tmp_path)[n]["s1"] < 0.97 for n in planted)


def test_mixed_sizes_are_resized_like_prepare(cli, tmp_path: Path, prepared: Path) -> None:  # type: ignore[no-untyped-def]
    planted = plant_samples(prepared, tmp_path / "samples", copies=1, novel=0)
    name = next(iter(planted))
    with Image.open(tmp_path / "samples" / name) as image:  # the copy at 4× size, and cropped wide
        image.resize((64, 64), Image.Resampling.BICUBIC).save(tmp_path / "samples" / "big.png")
    (tmp_path / "samples" / name).unlink()
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (30, 50, 3), dtype=np.uint8)).save(tmp_path / "samples" / "nested.jpg")
    (tmp_path / "samples" / "deeper").mkdir()
    Image.fromarray(rng.integers(0, 255, (9, 9), dtype=np.uint8)).save(tmp_path / "samples" / "deeper" / "gray.png")
    assert _audit(cli, tmp_path, tmp_path / "samples", prepared).code == 3
    rows = _rows(tmp_path)
    assert set(rows) == {"big.png", "nested.jpg", "deeper/gray.png"}
    assert (rows["big.png"]["width"], rows["nested.jpg"]["width"], rows["deeper/gray.png"]["height"]) == (64, 50, 9)
    assert rows["big.png"]["verdict"] == "copy" and rows["big.png"]["top1_record_id"] == planted[name]


def test_unreadable_files_are_rows_not_failures(cli, tmp_path: Path, prepared: Path) -> None:  # type: ignore[no-untyped-def]
    plant_samples(prepared, tmp_path / "samples", copies=0, novel=2)
    (tmp_path / "samples" / "broken.png").write_bytes(b"not a png")
    result = _audit(cli, tmp_path, tmp_path / "samples", prepared)
    assert result.code == 0 and "could not be read" in result.out
    row = _rows(tmp_path)["broken.png"]
    assert row["status"] == "error" and row["verdict"] is None and "broken.png" in row["error"]
    assert json.loads((tmp_path / "report" / "summary.json").read_text())["counts"]["error"] == 1


@pytest.mark.parametrize("case", ["missing", "empty", "all unreadable", "not prepared"])
def test_bad_sample_folders_exit_2(cli, tmp_path: Path, prepared: Path, case: str) -> None:  # type: ignore[no-untyped-def]
    samples, data = tmp_path / "samples", prepared
    if case != "missing":
        samples.mkdir()
        (samples / "notes.txt").write_text("no images here")
    if case == "all unreadable":
        (samples / "a.png").write_bytes(b"\x89PNG broken")
    if case == "not prepared":
        plant_samples(prepared, samples, copies=0, novel=1)
        data = tmp_path
    fragment = {"missing": "not a directory", "empty": "no PNG or JPEG", "all unreadable": "none of the 1",
                "not prepared": "not a prepared directory"}[case]
    _assert_one_line_error(_audit(cli, tmp_path, samples, data), fragment)


def test_clip_without_weights_says_how_to_provide_them(cli, tmp_path: Path, prepared: Path) -> None:  # type: ignore[no-untyped-def]
    plant_samples(prepared, tmp_path / "samples", copies=0, novel=1)
    _assert_one_line_error(_audit(cli, tmp_path, tmp_path / "samples", prepared, "--embedder", "clip"),
                           "needs local weights", "--clip-weights", "--embedder pixel", "never downloaded")
    _assert_one_line_error(_audit(cli, tmp_path, tmp_path / "samples", prepared, "--clip-weights", tmp_path / "nope.pt"),
                           "no such file", "--clip-weights")


def test_bad_audit_config_exits_2(cli, tmp_path: Path, prepared: Path) -> None:  # type: ignore[no-untyped-def]
    plant_samples(prepared, tmp_path / "samples", copies=0, novel=1)
    bad = write_policy(tmp_path / "bad.yaml", {"embedder": {"transform": ["flip"]}})
    _assert_one_line_error(_audit(cli, tmp_path, tmp_path / "samples", prepared, "--config", bad), "did you mean transforms")
    _assert_one_line_error(_audit(cli, tmp_path, tmp_path / "samples", prepared, "--alpha-copy", "0.5"), "alpha_copy")


class _Spy:
    """Records every record id the CelebA reader loads, by split."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.loaded: list[tuple[str, str]] = []
        original = CelebAReader.load

        def load(reader: CelebAReader, record_id: str) -> np.ndarray:
            self.loaded.append((reader.spec.split, record_id))
            return original(reader, record_id)

        monkeypatch.setattr(CelebAReader, "load", load)


def _partitions(prepared: Path) -> dict[str, set[str]]:
    rows = pq.read_table(prepared / "manifest.parquet", columns=["record_id", "partition"]).to_pylist()
    return {p: {r["record_id"] for r in rows if r["partition"] == p} for p in ("clean", "protected", "excluded")}


def test_reads_only_protected_originals_and_the_other_splits(cli, tmp_path: Path, prepared: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    plant_samples(prepared, tmp_path / "samples", copies=0, novel=2)
    spy = _Spy(monkeypatch)
    assert _audit(cli, tmp_path, tmp_path / "samples", prepared).code == 0
    parts = _partitions(prepared)
    train = [rid for split, rid in spy.loaded if split == "train"]
    assert sorted(train) == sorted(parts["protected"])  # each protected original once, nothing else of train
    assert {split for split, _ in spy.loaded} == {"train", "valid", "test"}
    spy.loaded.clear()
    none = write_policy(tmp_path / "none.yaml", {"calibration": {"holdout": "none"}, "cache": {"enabled": False}})
    result = _audit(cli, tmp_path, tmp_path / "samples", prepared, "--config", none, "--no-index-cache")
    assert result.code == 0 and {split for split, _ in spy.loaded} == {"train"}
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["thresholds"]["method"] == "default" and "no holdout" in summary["thresholds"]["note"]
    assert summary["thresholds"]["copy"] == 0.97 and summary["thresholds"]["expected_fpr"]["copy"] is None


def test_opt_outs_are_never_a_holdout(cli, tmp_path: Path, celeba_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    policy = celeba_policy(celeba_root, tmp_path / "prepared")
    policy["rules"].insert(0, {"name": "opt-out", "action": "exclude", "where": "identity IN (1, 2, 3)"})
    prepared = prepare(load_policy(write_policy(tmp_path / "p.yaml", policy))).output
    plant_samples(prepared, tmp_path / "samples", copies=0, novel=1)
    spy = _Spy(monkeypatch)
    assert _audit(cli, tmp_path, tmp_path / "samples", prepared).code == 0
    identities = dict(line.split() for line in (celeba_root / "identity_CelebA.txt").read_text().splitlines())
    held = [rid for split, rid in spy.loaded if split != "train"]
    assert held and all(identities[rid] not in ("1", "2", "3") for rid in held)
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    dropped = summary["thresholds"]["holdout"]["dropped"]["excluded_by_policy"]
    assert dropped == sum(identities[f"{i:06d}.jpg"] in ("1", "2", "3") for i in range(33, 41))


def test_changed_original_fails_the_hash_check(cli, tmp_path: Path, prepared: Path, celeba_root: Path) -> None:  # type: ignore[no-untyped-def]
    copy_root = tmp_path / "celeba-copy"
    shutil.copytree(celeba_root, copy_root)
    victim = sorted(_partitions(prepared)["protected"])[0]
    Image.new("RGB", (178, 218), (10, 200, 30)).save(copy_root / "img_align_celeba" / victim)
    plant_samples(prepared, tmp_path / "samples", copies=0, novel=1)
    result = _audit(cli, tmp_path, tmp_path / "samples", prepared, "--data-root", copy_root, "--no-index-cache")
    _assert_one_line_error(result, victim, "does not match the sha256", code=1)  # a failed check


def test_cached_index_opens_no_original(cli, tmp_path: Path, prepared: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    plant_samples(prepared, tmp_path / "samples", copies=1, novel=2)
    none = write_policy(tmp_path / "none.yaml", {"calibration": {"holdout": "none"}})
    assert _audit(cli, tmp_path, tmp_path / "samples", prepared, "--config", none).code == 3
    entries = [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1 and (tmp_path / "cache").stat().st_mode & 0o077 == 0
    spy = _Spy(monkeypatch)
    assert _audit(cli, tmp_path, tmp_path / "samples", prepared, "--config", none, "--no-thumbnails").code == 3
    assert spy.loaded == [] and json.loads((tmp_path / "report" / "summary.json").read_text())["index"]["cache"] == "cached"
    smaller = write_policy(tmp_path / "small.yaml", {"calibration": {"holdout": "none"}, "embedder": {"pixel_size": 8}})
    assert _audit(cli, tmp_path, tmp_path / "samples", prepared, "--config", smaller, "--no-thumbnails").code == 3
    assert len(spy.loaded) == len(_partitions(prepared)["protected"])  # another embedder: rebuilt from originals


def test_holdout_folder_calibrates_and_drops_protected_copies(cli, tmp_path: Path, prepared: Path) -> None:  # type: ignore[no-untyped-def]
    plant_samples(prepared, tmp_path / "samples", copies=1, novel=2)
    plant_samples(prepared, tmp_path / "holdout", copies=2, novel=5, seed=7)
    assert _audit(cli, tmp_path, tmp_path / "samples", prepared, "--holdout", tmp_path / "holdout").code == 3
    holdout = json.loads((tmp_path / "report" / "summary.json").read_text())["thresholds"]["holdout"]
    assert holdout["source"].startswith("dir:") and holdout["count"] == 5 and holdout["dropped"]["copy_of_protected"] == 2


def test_formats_without_splits_use_documented_defaults(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from helpers import digits_policy

    prepared = prepare(load_policy(write_policy(tmp_path / "d.yaml", digits_policy(tmp_path / "digits")))).output
    plant_samples(prepared, tmp_path / "samples", copies=1, novel=2)
    assert _audit(cli, tmp_path, tmp_path / "samples", prepared).code == 3
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    th = summary["thresholds"]
    assert th["method"] == "default" and "uses every split" in th["note"] and "excluded records are never" in th["note"]
    assert summary["warnings"] and "--holdout" in summary["warnings"][0]  # digits are too alike for the defaults


def test_approximate_candidates_still_give_exact_verdicts(cli, tmp_path: Path, prepared: Path) -> None:  # type: ignore[no-untyped-def]
    planted = plant_samples(prepared, tmp_path / "samples", copies=2, novel=3)
    assert _audit(cli, tmp_path, tmp_path / "samples", prepared).code == 3
    exact = _rows(tmp_path)
    ann = write_policy(tmp_path / "ann.yaml", {"search": {"exact_limit": 5, "candidates": 8}})
    assert _audit(cli, tmp_path, tmp_path / "samples", prepared, "--config", ann).code == 3
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert "re-rank" in summary["index"]["kind"] and list((tmp_path / "cache").glob("*/ivf.faiss"))
    rows = _rows(tmp_path)
    assert all(rows[n]["verdict"] == "copy" and rows[n]["top1_record_id"] == s for n, s in planted.items())
    for name, row in rows.items():  # every similarity reported is the exact one for the id it names
        exact_sims = dict(zip(exact[name]["topk_record_ids"], exact[name]["topk_similarities"], strict=True))
        assert all(exact_sims.get(r, s) == pytest.approx(s, abs=1e-5) for r, s in zip(row["topk_record_ids"], row["topk_similarities"], strict=True))


def test_the_page_names_the_rule_that_fired_and_warns_when_uncalibrated(cli, tmp_path: Path, prepared: Path) -> None:  # type: ignore[no-untyped-def]
    """Noise images, uncalibrated thresholds: the L2-ratio rule (which needs a minimum similarity) flags none of
    them; the planted copy's row names its rules; the page warns that the thresholds are uncalibrated."""
    import re

    import numpy as np
    from PIL import Image

    plant_samples(prepared, tmp_path / "samples", copies=1, novel=0)
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, size=(48, 48, 3), dtype=np.uint8)).save(tmp_path / "samples" / f"noise-{i}.png")
    (tmp_path / "a.yaml").write_text("version: 1\ncalibration: {holdout: none}\n")
    assert _audit(cli, tmp_path, tmp_path / "samples", prepared, "--config", tmp_path / "a.yaml").code == 3
    rows = _rows(tmp_path)
    assert all(rows[f"noise-{i}.png"]["verdict"] == "novel" and "l2_ratio<=ratio" not in rows[f"noise-{i}.png"]["rules"] for i in range(5))
    page = (tmp_path / "report" / "report.html").read_text()
    text = " ".join(re.sub(r"<[^>]+>", " ", re.sub(r"<svg.*?</svg>", "", page, flags=re.S)).split())
    assert "Uncalibrated thresholds." in text and "unknown" in text
    copy_row = text.split("copy-000.png", 1)[1].split("noise-", 1)[0]
    assert "exact copy (byte-identical pixels)" in copy_row and "similarity ≥ copy threshold 0.9700" in copy_row
    assert "L2 ratio ≤ 0.5000 with similarity ≥ 0.8000" in copy_row
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["thresholds"]["ratio_min_similarity"] == 0.8 and summary["top"][0]["rules"][0] == "hash"
