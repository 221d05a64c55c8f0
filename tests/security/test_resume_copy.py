"""`guard train --resume COPY` continues the copy and leaves the original run byte-for-byte unchanged."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import yaml

from helpers import digits_policy, read_events, tiny_pipeline, write_policy


def _tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_resume_of_a_copy_continues_the_copy(cli, tmp_path: Path, _isolated_ledger: Path) -> None:  # type: ignore[no-untyped-def]
    write_policy(tmp_path / "policy.yaml", digits_policy(tmp_path / "prepared", drop=0.8))
    assert cli("prepare", "--policy", tmp_path / "policy.yaml").code == 0
    write_policy(tmp_path / "pipeline.yaml", tiny_pipeline(tmp_path / "prepared", tmp_path / "original"))
    assert cli("train", "--pipeline", tmp_path / "pipeline.yaml").code == 0
    original = tmp_path / "original"
    before = _tree(original)

    copy = Path(shutil.copytree(original, tmp_path / "copy"))
    # the copy continues from its mid-run checkpoint (a finished run returns at once), with a larger budget
    shutil.rmtree(copy / "checkpoints" / "step-000000008")
    (copy / "checkpoints" / "latest").write_text("step-000000004")
    resolved = yaml.safe_load((copy / "config.resolved.yaml").read_text())
    resolved["schedule"]["pretrain_kimg"] = 0.256  # a larger budget: 16 steps instead of 8
    (copy / "config.resolved.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))

    result = cli("train", "--resume", copy)
    assert result.code == 0, result.err
    assert _tree(original) == before, "the original run was written to"
    assert (copy / "checkpoints" / "latest").read_text().strip() == "step-000000016"
    assert "step-000000016" in result.out and str(copy.resolve()) in result.out
    assert yaml.safe_load((copy / "config.resolved.yaml").read_text())["out"] == str(copy.resolve())
    runs = [e for e in read_events(_isolated_ledger).to_pylist() if e["kind"] == "train"]
    # ledger paths are relative to the project, the ledger's parent (docs/ledger.md): it must lead to the copy
    assert [str((_isolated_ledger.parent / o["path"]).resolve()) for o in runs[-1]["outputs"] if o["role"] == "run"] == [
        str(copy.resolve())]
