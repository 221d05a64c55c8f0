"""Helpers shared by the tests (import as `from helpers import ...`)."""

from __future__ import annotations

from pathlib import Path

import yaml


def celeba_policy(root: Path, out: Path, **overrides: object) -> dict:
    policy: dict = {
        "version": 1,
        "name": "celeba-test",
        "dataset": {"format": "celeba", "root": str(root), "split": "train", "resolution": 16},
        "rules": [
            {"name": "licensed", "action": "clean", "sample": {"fraction": 0.3, "seed": 0, "by": "identity"}},
            {"name": "everything-else", "action": "protect"},
        ],
        "noise": {"sigma": 0.5, "seed": 0},
        "output": str(out),
    }
    policy.update(overrides)
    return policy


def write_policy(path: Path, policy: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(policy, sort_keys=False))
    return path


def tiny_pipeline(data: Path, out: Path, **overrides: object) -> dict:
    """A pipeline small enough for tests: 8 px digits, a 16-channel U-Net, a few dozen steps."""
    pipeline: dict = {
        "version": 1, "name": "tiny", "data": str(data), "method": "clean-only",
        "model": {"model_channels": 16, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [4]},
        "optimizer": {"lr": 2e-3, "warmup_kimg": 0.1}, "batch": 16,
        "schedule": {"pretrain_kimg": 0.128},  # 8 steps
        "ema": {"halflife_kimg": 0.05}, "seed": 0, "device": "cpu",
        "checkpoint_every": 4, "snapshot_every": 1000, "grid_size": 4, "out": str(out),
    }
    pipeline.update(overrides)
    return pipeline


def digits_policy(out: Path, resolution: int = 8) -> dict:
    return {"version": 1, "name": "digits", "dataset": {"format": "digits", "resolution": resolution},
            "rules": [{"name": "licensed", "action": "clean", "sample": {"fraction": 0.1}},
                      {"name": "rest", "action": "protect"}],
            "noise": {"sigma": 0.6}, "output": str(out)}
