"""`guard membership`: the membership test of a trained model (auditing/membership.py, auditing/model_audit.py).

- The statistics against brute-force oracles (every pair for the AUC, every threshold for the TPR).
- Power: a deliberately memorised network (a small U-Net over-trained on 32 digits) is told from unseen digits with
  AUC >= 0.9; two disjoint samples of unseen digits are not (the interval holds 0.5).
- The command on a digits run: the report, its ledger event, every number recomputed from membership.parquet, and
  forged numbers or scores caught; bad input is one line and exit 2 with a failed event.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import digits_run_with_holdout
from sfbd_guard.auditing.membership import (
    auc,
    common_noise,
    compare,
    denoising_errors,
    membership_score,
    tpr_at_fpr,
)

SIGMAS = [0.05, 0.1, 0.2, 0.4, 0.8]
scores = st.lists(st.integers(-6, 6).map(float), min_size=1, max_size=30).map(np.asarray)


@settings(deadline=None)  # the first call imports scipy
@given(scores, scores)
def test_the_auc_is_the_share_of_pairs_a_member_wins(members: np.ndarray, others: np.ndarray) -> None:
    wins = sum(1.0 if m > o else 0.5 if m == o else 0.0 for m in members for o in others)
    assert auc(members, others) == pytest.approx(wins / (len(members) * len(others)), abs=1e-12)


@settings(deadline=None)
@given(scores, scores, st.sampled_from([0.0, 0.01, 0.1, 0.5]))
def test_tpr_at_fpr_is_the_best_threshold_within_the_false_positive_rate(members: np.ndarray, others: np.ndarray,
                                                                         fpr: float) -> None:
    candidates = [t for t in [*others, -np.inf, np.inf] if (others > t).mean() <= fpr]  # every admissible threshold
    assert tpr_at_fpr(members, others, fpr) == pytest.approx(max((members > t).mean() for t in candidates))


@pytest.fixture(scope="module")
def memorised() -> tuple[object, np.ndarray, np.ndarray]:
    """A small U-Net over-trained on 32 digits (EDM's loss, 300 full-batch steps), its members and 64 unseen digits."""
    import torch
    from sklearn.datasets import load_digits

    from sfbd_guard.diffusion.loss import EDMLoss
    from sfbd_guard.diffusion.networks import UNetConfig, build_denoiser

    torch.manual_seed(0)
    pixels = np.clip(np.round(load_digits().images / 16 * 255), 0, 255).astype(np.uint8)[:, None]
    members, unseen = pixels[:32], pixels[32:96]
    net = build_denoiser(UNetConfig(model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(),
                                    dropout=0.0, num_heads=1), 8, 1)
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
    x = torch.from_numpy(members.astype(np.float32) / 127.5 - 1)
    generator = torch.Generator().manual_seed(0)
    for _ in range(300):
        loss = EDMLoss()(net, x, generator=generator).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return net.eval(), members, unseen


def test_a_memorised_set_is_told_from_unseen_images(memorised: tuple[object, np.ndarray, np.ndarray]) -> None:
    net, members, unseen = memorised
    noise = common_noise((1, 8, 8), len(SIGMAS), 4, seed=0)
    member_scores = membership_score(denoising_errors(net, members, SIGMAS, noise, batch=64))
    unseen_scores = membership_score(denoising_errors(net, unseen, SIGMAS, noise, batch=64))
    result, _ = compare(member_scores, unseen_scores, resamples=1000, seed=0)
    assert result.auc >= 0.9 and result.auc_ci95[0] > 0.8
    # two disjoint samples of unseen images: nothing to tell apart
    null, _ = compare(unseen_scores[:32], unseen_scores[32:], resamples=1000, seed=0)
    assert null.auc_ci95[0] < 0.5 < null.auc_ci95[1]
    # common random numbers: an image's errors do not depend on the batch it is denoised in
    again = denoising_errors(net, unseen[5:6], SIGMAS, noise, batch=1)
    np.testing.assert_allclose(again, denoising_errors(net, unseen, SIGMAS, noise, batch=64)[5:6], rtol=1e-5)


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return digits_run_with_holdout(tmp_path_factory.mktemp("membership"))


def _events(ledger: Path) -> list[dict[str, object]]:
    import pyarrow.parquet as pq

    return [row for part in sorted(ledger.glob("**/*.parquet")) for row in pq.read_table(part).to_pylist()]


def test_the_command_reports_and_verifies_its_numbers(digits_run: tuple[Path, Path], tmp_path: Path, cli) -> None:  # type: ignore[no-untyped-def]
    from sfbd_guard.auditing.model_audit import recompute
    from sfbd_guard.contracts.membership import read_membership_summary

    data, run = digits_run
    report = tmp_path / "report"
    result = cli("membership", "--run", run, "--control", run, "--report", report, "--max-images", "64")
    assert result.code in (0, 3), result.err
    summary = read_membership_summary(report)
    assert summary.verdict in result.out and [g.group for g in summary.groups] == ["clean", "protected"]
    clean_records = sum(1 for _ in (data / "clean").glob("*")) and len(__import__("sfbd_guard.prepared.reader", fromlist=[
        "open_prepared"]).open_prepared(data).clean.record_ids)
    assert [(g.images, g.holdout_images) for g in summary.groups] == [(min(64, clean_records), 64), (64, 64)]
    protected = summary.groups[1]
    assert protected.control is not None and protected.difference_ci95 == [0.0, 0.0]  # the model is its own control
    assert not protected.distinguishable
    assert sorted(p.name for p in report.iterdir()) == ["membership.html", "membership.json", "membership.parquet",
                                                        "roc.svg"]
    assert "<svg" in (report / "membership.html").read_text() and "cannot be told from chance" in (
        report / "membership.html").read_text()
    assert recompute(report) == []
    events = [e for e in _events(tmp_path / "ledger") if e["kind"] == "membership"]
    assert [e["status"] for e in events] == ["ok"]
    assert json.loads(str(events[0]["summary"]))["scores_sha256"] == summary.scores_sha256

    from sfbd_guard.compliance.verify import check_membership
    from sfbd_guard.contracts.events import read_events

    def verified() -> list[object]:
        return check_membership(read_events(tmp_path / "ledger"), run.resolve(), tmp_path)

    assert [(c.name, c.passed) for c in verified()] == [("membership", True)]  # type: ignore[attr-defined]
    assert check_membership(read_events(tmp_path / "ledger"), tmp_path / "elsewhere", tmp_path) == []  # no test: no check

    forged = json.loads((report / "membership.json").read_text())  # a better number, re-hashed nowhere
    forged["groups"][1]["model"]["auc"] = 0.5
    (report / "membership.json").write_text(json.dumps(forged))
    assert any("group protected says" in p for p in recompute(report))
    assert not verified()[0].passed  # type: ignore[attr-defined]  # the summary's sha256 is not the ledger's
    shutil.copy(report / "membership.parquet", tmp_path / "kept.parquet")
    (report / "membership.parquet").write_bytes(b"PAR1" + b"\0" * 16)
    assert any("sha256" in p for p in recompute(report))


def test_bad_input_is_one_line_and_exit_2(digits_run: tuple[Path, Path], tmp_path: Path, cli) -> None:  # type: ignore[no-untyped-def]
    from PIL import Image

    _data, run = digits_run
    empty = tmp_path / "no-checkpoints"
    shutil.copytree(run, empty, ignore=shutil.ignore_patterns("checkpoints"))
    result = cli("membership", "--run", empty, "--report", tmp_path / "r1")
    assert result.code == 2 and "no checkpoint" in result.err and "Traceback" not in result.err

    three = tmp_path / "three"
    three.mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(three / f"{i}.png")
    result = cli("membership", "--run", run, "--holdout", three, "--report", tmp_path / "r2")
    assert result.code == 2 and "fewer than membership.min_holdout" in result.err

    other = tmp_path / "not-a-control"
    shutil.copytree(run, other)
    resolved = other / "config.resolved.yaml"
    resolved.write_text(resolved.read_text().replace("method: clean-only", "method: noisy-direct"))
    result = cli("membership", "--run", run, "--control", other, "--report", tmp_path / "r3")
    assert result.code == 2 and "control must never have seen them" in result.err
    statuses = [e["status"] for e in _events(tmp_path / "ledger") if e["kind"] == "membership"]
    assert statuses == ["failed"] * 3
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists()


def _summary(verdict: str, protected_low: float) -> object:
    from sfbd_guard.contracts.base import validate
    from sfbd_guard.contracts.membership import MembershipSummary

    def result(auc: float, low: float) -> dict[str, object]:
        return {"auc": auc, "auc_ci95": [low, min(1.0, 2 * auc - low)], "tpr_at_1pct_fpr": 0.1, "tpr_ci95": [0.0, 0.2]}

    def group(name: str, auc: float, low: float) -> dict[str, object]:
        return {"group": name, "images": 100, "holdout_images": 80, "model": result(auc, low), "control": None,
                "difference_ci95": None, "control_note": "none", "distinguishable": low > 0.52, "power": "±0.1"}

    model = {"run": "/r", "checkpoint": "/r/ema.safetensors", "sha256": "0" * 64, "method": "sfbd"}
    return validate(MembershipSummary, {
        "model": model, "control": None, "prepared": "/p", "prepared_fingerprint": "f", "holdout_source": "rules:h",
        "score": "s", "sigmas": [0.1], "draws": 1, "seed": 0, "bootstrap": 100, "margin": 0.02, "max_images": 100,
        "groups": [group("clean", 0.9, 0.85), group("protected", protected_low + 0.05, protected_low)],
        "verdict": verdict, "verdict_reason": "r", "scores_sha256": "0" * 64, "seconds": 1.0}, source="test")


def test_the_compliance_verdict_and_model_card_weigh_the_membership_test() -> None:
    from sfbd_guard.compliance.cards import _membership_words
    from sfbd_guard.compliance.chains import Chain, judge

    def reasons(chain: Chain) -> list[tuple[str, str]]:
        return [(r.level, r.text) for r in judge(chain, verified=False) if "membership" in r.text]

    plain = Chain(Path("run"))
    assert reasons(plain) == [("info", "no membership test of the model's weights (guard membership): only its samples "
                                       "were audited")]
    passed = Chain(Path("run"), membership=_summary("PASS", 0.45))  # type: ignore[arg-type]
    [(level, text)] = reasons(passed)
    assert level == "info" and "AUC 0.500 (95 % interval 0.450–0.550)" in text and "0.900" in text and "power" in text
    flagged = Chain(Path("run"), membership=_summary("ATTENTION", 0.6))  # type: ignore[arg-type]
    [(level, text)] = reasons(flagged)
    assert level == "attention" and "tells the protected images from never-seen ones" in text
    assert _membership_words(flagged).startswith("Membership test of the weights (ATTENTION)")


def test_an_interrupted_test_goes_on_where_it_stopped(digits_run: tuple[Path, Path], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from sfbd_guard.auditing import membership_workers
    from sfbd_guard.auditing.config import resolve_audit_config
    from sfbd_guard.auditing.model_audit import run_membership

    _data, run = digits_run
    config = resolve_audit_config(None, {"membership.max_images": 32, "membership.batch": 1, "membership.bootstrap": 200})
    straight = run_membership(run=run, report=tmp_path / "straight", config=config).summary
    real, calls = membership_workers.denoising_errors, []

    def killed_later(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) > 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(membership_workers, "denoising_errors", killed_later)
    with pytest.raises(KeyboardInterrupt):
        run_membership(run=run, report=tmp_path / "resumed", config=config)
    kept = sorted((tmp_path / "resumed" / ".partial").glob("*/*.npy"))
    assert len(kept) == 2 and not (tmp_path / "resumed" / "membership.json").exists()
    kept_rows = sum(np.load(path).shape[0] for path in kept)

    computed: list[int] = []
    monkeypatch.setattr(membership_workers, "denoising_errors", lambda *a, **k: computed.append(len(a[1])) or real(*a, **k))
    resumed = run_membership(run=run, report=tmp_path / "resumed", config=config).summary
    every = sum(g.images for g in straight.groups) + straight.groups[0].holdout_images
    assert sum(computed) == every - kept_rows > 0  # the 2 units kept are not computed again
    assert resumed.groups == straight.groups and resumed.scores_sha256 == straight.scores_sha256
    assert not (tmp_path / "resumed" / ".partial").exists()
