"""Hostile pickles: weights files and CIFAR batches are loaded without running code from them."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from sfbd_guard.errors import InputError


class _Payload:
    """Unpickling this calls `open(marker, 'w')`: code execution, if anything unpickles it for real."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (str(self.marker), "w"))


def test_a_clip_weights_pickle_cannot_run_code(tmp_path: Path) -> None:
    import torch

    from sfbd_guard.embedding.clip import ClipEmbedder

    marker = tmp_path / "pwned"
    weights = tmp_path / "evil.pt"
    torch.save({"visual.proj": _Payload(marker)}, weights)  # a .pt is a zip holding a pickle
    with pytest.raises(InputError, match="cannot load"):
        ClipEmbedder(weights=str(weights), model="ViT-B-32", quick_gelu=False)
    assert not marker.exists()


def test_a_cifar_batch_pickle_cannot_run_code(tmp_path: Path) -> None:
    from fixtures.synthetic import write_cifar10
    from sfbd_guard.datasets import SourceSpec, open_reader

    root = write_cifar10(tmp_path / "cifar", 4)
    marker = tmp_path / "pwned"
    batch = root / "cifar-10-batches-py" / "data_batch_1"
    batch.write_bytes(pickle.dumps({b"data": _Payload(marker), b"labels": [0]}, protocol=2))
    with pytest.raises(InputError):
        open_reader(SourceSpec("cifar10", root, "train", 32)).metadata()
    assert not marker.exists()


def test_a_policy_naming_pickled_dedup_weights_cannot_run_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A hostile policy points dedup's clip embedder at a pickle: `guard prepare` exits 2 before any work."""
    import torch

    from helpers import guard, write_policy

    marker = tmp_path / "pwned"
    torch.save({"visual.proj": _Payload(marker)}, tmp_path / "evil.pt")
    policy = write_policy(tmp_path / "p.yaml", {
        "version": 1, "name": "p", "dataset": {"format": "digits", "resolution": 8},
        "rules": [{"name": "all", "action": "protect"}], "noise": {"sigma": 0.5}, "output": "out",
        "dedup": {"embedder": "clip", "clip_weights": "evil.pt"}})
    assert guard("prepare", "--policy", policy, "--ledger", tmp_path / "ledger") == 2
    err = capsys.readouterr().err
    assert "cannot load" in err and "Traceback" not in err
    assert not marker.exists() and not (tmp_path / "out").exists()
