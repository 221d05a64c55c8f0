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
