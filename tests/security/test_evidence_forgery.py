"""Issue 12 §4: evidence that cannot be forged by re-hashing.

The attack: replace a prepared directory's protected arrays by the originals (x/127.5 - 1 as float16, no
noise), recompute every sha256 in card.json (files, manifest, fingerprint), then train on it and verify the run.
Before the fix `guard train` exited 0 and `guard verify` said "all N protected records noised".
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from helpers import digits_policy, tiny_pipeline, write_policy
from helpers import guard as _guard
from sfbd_guard.hashing import fingerprint, sha256_file


@pytest.fixture(scope="module")
def honest(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Digits at 8 px prepared through the CLI into a ledger, and a tiny run trained on them."""
    folder = tmp_path_factory.mktemp("honest")
    ledger = folder / "ledger"
    policy = write_policy(folder / "policy.yaml", digits_policy(folder / "prepared"))
    assert _guard("prepare", "--policy", policy, "--ledger", ledger) == 0
    pipeline = write_policy(folder / "pipeline.yaml", tiny_pipeline(folder / "prepared", folder / "run"))
    assert _guard("train", "--pipeline", pipeline, "--ledger", ledger) == 0
    return folder, ledger


def originals(prepared: Path) -> dict[str, np.ndarray]:
    """The protected originals of `prepared`, as the attacker (who holds the source data) has them: uint8 CHW."""
    from sfbd_guard.datasets import SourceSpec, open_reader

    card = json.loads((prepared / "card.json").read_text())
    reader = open_reader(SourceSpec(card["format"], None, card["split"], card["resolution"]))
    rows = pq.read_table(prepared / "manifest.parquet").to_pylist()
    return {r["record_id"]: reader.load(r["record_id"]) for r in rows if r["partition"] == "protected"}


def forge(source: Path, out: Path, *, noise: float = 0.0, seed: int = 0) -> Path:
    """A copy of `source` whose protected rows are the originals (+ `noise` × sigma Gaussian noise), re-hashed."""
    prepared = Path(shutil.copytree(source, out))
    (prepared / "card.sig").unlink(missing_ok=True)
    card = json.loads((prepared / "card.json").read_text())
    rows = pq.read_table(prepared / "manifest.parquet").to_pylist()
    pixels = originals(prepared)
    rng = np.random.default_rng(seed)
    for file in sorted({r["file"] for r in rows if r["partition"] == "protected"}):
        array = np.load(prepared / file)
        for row in (r for r in rows if r["file"] == file):
            x = pixels[row["record_id"]].astype(np.float64) / 127.5 - 1
            array[row["row"]] = (x + noise * card["sigma"] * rng.standard_normal(x.shape)).astype(np.float16)
        np.save(prepared / file, array)
    card["files"] = {name: sha256_file(prepared / name) for name in card["files"]}
    card["manifest_sha256"] = sha256_file(prepared / "manifest.parquet")
    card["fingerprint"] = fingerprint({**card["files"], "manifest.parquet": card["manifest_sha256"]})
    (prepared / "card.json").write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    return prepared


def fake_prepare_event(ledger: Path, prepared: Path) -> None:
    """What an attacker with write access to the ledger can add: a prepare event for the forged fingerprint."""
    from sfbd_guard.ledger import Artifact, EventDraft, write_event

    card = json.loads((prepared / "card.json").read_text())
    draft = EventDraft(kind="prepare", command=["guard", "prepare"])
    draft.inputs.append(Artifact("policy", card["policy_path"], card["policy_sha256"]))
    draft.outputs.append(Artifact("prepared", str(prepared), card["fingerprint"]))
    draft.outputs.extend(Artifact("array", f"{prepared}/{name}", digest) for name, digest in sorted(card["files"].items()))
    draft.summary.update(sigma=card["sigma"], counts=card["counts"], rule_counts=card["rule_counts"],
                         policy_name=card["policy_name"], format=card["format"], split=card["split"],
                         resolution=card["resolution"], errors=0, seconds=0.0)  # a complete, valid prepare event
    write_event(ledger, draft, status="ok")


def train_unchecked(prepared: Path, run: Path, ledger: Path, tmp: Path) -> Path:
    """A run made from `prepared` by a trainer who skips guard train's checks (the library's `train`), with
    the train event guard train writes: what `guard verify` is then handed."""
    from sfbd_guard.engine.config import load_pipeline
    from sfbd_guard.engine.service import train
    from sfbd_guard.ledger import Artifact, recorded

    config = load_pipeline(write_policy(tmp / f"{run.name}.yaml", tiny_pipeline(prepared, run)))
    with recorded(ledger, "train", ["guard", "train"]) as event:
        outcome = train(config, resume=False)
        card = json.loads((prepared / "card.json").read_text())
        event.inputs.append(Artifact("prepared", str(prepared), card["fingerprint"]))
        event.inputs.extend(Artifact("array", f"{prepared}/{n}", d) for n, d in sorted(card["files"].items()))
        event.outputs.append(Artifact("run", str(outcome.run_dir), None))
        event.summary.update(method=config.method, name=config.name, resumed=False, step=outcome.step,
                             kimg=outcome.kimg, seconds=0.0, device=config.device, world_size=1)  # a valid train event
    return outcome.run_dir


def _verify(cli, run: Path, ledger: Path, *extra: object) -> tuple[int, dict[str, str], str]:  # type: ignore[no-untyped-def]
    result = cli("verify", "--run", run, "--ledger", ledger, *extra)
    lines = [line for line in result.out.splitlines() if line.startswith(("PASS", "FAIL", "ATTENTION"))]
    return result.code, {line.split(":")[0].split("  ", 1)[1]: line.split("  ", 1)[0] for line in lines}, result.out


def test_forged_directory_is_refused_by_train(honest, tmp_path: Path, cli) -> None:  # type: ignore[no-untyped-def]
    folder, ledger = honest
    forged = forge(folder / "prepared", tmp_path / "forged")
    pipeline = write_policy(tmp_path / "p.yaml", tiny_pipeline(forged, tmp_path / "run"))
    result = cli("train", "--pipeline", pipeline, "--ledger", ledger)
    assert result.code == 1, result.out  # the provenance check failed
    assert result.err.startswith("error: ") and "Traceback" not in result.err
    assert "no prepare event" in result.err and "--allow-unrecorded" in result.err.splitlines()[0]
    assert not (tmp_path / "run").exists()
    # --allow-unrecorded does not let the originals through: the noise statistics refuse them
    result = cli("train", "--pipeline", pipeline, "--ledger", ledger, "--allow-unrecorded")
    assert result.code == 1 and "not noisy copies at sigma 0.6" in result.err and "σ̂" in result.err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_forged_directory_with_a_fake_prepare_event_is_still_refused(honest, tmp_path: Path, cli) -> None:  # type: ignore[no-untyped-def]
    folder, ledger = honest
    forged = forge(folder / "prepared", tmp_path / "forged")
    fake_ledger = Path(shutil.copytree(ledger, tmp_path / "ledger"))
    fake_prepare_event(fake_ledger, forged)
    pipeline = write_policy(tmp_path / "p.yaml", tiny_pipeline(forged, tmp_path / "run"))
    result = cli("train", "--pipeline", pipeline, "--ledger", fake_ledger)
    assert result.code == 1 and "not noisy copies" in result.err
    first = json.loads((forged / "card.json").read_text())
    assert "first " in result.err and any(rid in result.err for rid in originals(forged)), "names a failing record"
    assert first["sigma"] == 0.6


def test_verify_fails_a_run_made_from_a_forged_directory(honest, tmp_path: Path, cli) -> None:  # type: ignore[no-untyped-def]
    folder, ledger = honest
    forged = forge(folder / "prepared", tmp_path / "forged")
    run = train_unchecked(forged, tmp_path / "run", ledger, tmp_path)
    code, checks, out = _verify(cli, run, ledger)
    assert code == 1
    assert checks["provenance"] == "FAIL" and checks["noise statistics"] == "FAIL"
    assert checks["consumed arrays"] == "PASS", "every sha256 was recomputed: hashes alone cannot tell"
    assert "Haar MAD" in out and "1e-09" in out  # the estimator and its thresholds are stated
    # even with a ledger entry faked for it, the pixels give it away
    fake_prepare_event(ledger, forged)
    code, checks, _ = _verify(cli, run, ledger)
    assert code == 1 and checks["provenance"] == "PASS" and checks["noise statistics"] == "FAIL"


def test_verify_passes_the_honest_run(honest, cli) -> None:  # type: ignore[no-untyped-def]
    folder, ledger = honest
    _code, checks, out = _verify(cli, folder / "run", ledger)
    assert checks["provenance"] == "PASS" and checks["noise statistics"] == "PASS", out
    assert checks["consumed arrays"] == "PASS" and checks["noise"] == "PASS"


@pytest.mark.parametrize("noise", [1e-3, 0.1])
def test_originals_disguised_with_small_noise_fail_the_statistics(honest, tmp_path: Path, noise: float) -> None:  # type: ignore[no-untyped-def]
    from sfbd_guard.prepared.reader import check_noise_statistics, open_prepared

    folder, _ = honest
    stats = check_noise_statistics(open_prepared(forge(folder / "prepared", tmp_path / "forged", noise=noise)))
    assert not stats.passed and stats.failures > 0 and stats.first_failure


def test_originals_with_noise_at_a_third_of_sigma_fail_the_pooled_test(honest, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from sfbd_guard.prepared.reader import check_noise_statistics, open_prepared

    folder, _ = honest
    stats = check_noise_statistics(open_prepared(forge(folder / "prepared", tmp_path / "forged", noise=1 / 3)))
    assert not stats.passed and stats.pooled_share > stats.pooled_limit


def test_originals_with_full_sigma_noise_are_a_valid_noisy_copy(honest, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from sfbd_guard.prepared.reader import check_noise_statistics, open_prepared

    folder, _ = honest
    assert check_noise_statistics(open_prepared(forge(folder / "prepared", tmp_path / "forged", noise=1.0))).passed


def test_verify_reads_no_file_a_forged_manifest_points_outside(honest: tuple[Path, Path], tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """A manifest row (and a card entry) naming `../outside.npy`: verify fails and never opens that file."""
    import os
    import sys

    folder, ledger = honest
    prepared = Path(shutil.copytree(folder / "prepared", tmp_path / "prepared"))
    run = Path(shutil.copytree(folder / "run", tmp_path / "run"))
    info = json.loads((run / "run.json").read_text())
    info["data"] = str(prepared)
    (run / "run.json").write_text(json.dumps(info))
    outside = tmp_path / "outside.npy"
    np.save(outside, np.zeros((4, 1, 8, 8), np.uint8))
    table = pq.read_table(prepared / "manifest.parquet")
    files = table.column("file").to_pylist()
    first_clean = table.column("partition").to_pylist().index("clean")
    files[first_clean] = "../outside.npy"
    import pyarrow as pa

    pq.write_table(table.set_column(table.schema.get_field_index("file"), "file", pa.array(files, pa.string())),
                   prepared / "manifest.parquet")
    card = json.loads((prepared / "card.json").read_text())
    card["files"]["../outside.npy"] = sha256_file(outside)
    card["manifest_sha256"] = sha256_file(prepared / "manifest.parquet")
    card["fingerprint"] = fingerprint({**card["files"], "manifest.parquet": card["manifest_sha256"]})
    (prepared / "card.json").write_text(json.dumps(card))
    opened: list[str] = []
    state = {"on": True}

    def hook(event: str, args: tuple) -> None:  # type: ignore[type-arg]
        if state["on"] and event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            opened.append(os.fsdecode(args[0]))

    sys.addaudithook(hook)
    try:
        code = _guard("verify", "--run", run, "--ledger", ledger)
    finally:
        state["on"] = False
    captured = capsys.readouterr()
    assert code == 1 and "Traceback" not in captured.err
    assert not [p for p in opened if Path(p).name == "outside.npy"], "verify opened a file outside the prepared directory"
