"""The shipped pipelines (pipelines/*.yaml): each loads, matches its policy and builds its network."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sfbd_guard.auditing import resolve_audit_config
from sfbd_guard.engine.config import load_pipeline
from sfbd_guard.engine.trainer import build_net
from sfbd_guard.policy.model import load_policy

PIPELINES = sorted((Path(__file__).resolve().parents[1] / "pipelines").glob("*.yaml"))


def test_the_papers_settings_are_shipped() -> None:
    assert {p.stem for p in PIPELINES} >= {"digits", "celeba", "cifar10"}


@pytest.mark.parametrize("path", PIPELINES, ids=[p.stem for p in PIPELINES])
def test_pipeline_loads_matches_its_policy_and_builds(path: Path) -> None:
    config = load_pipeline(path)
    assert config.method == "sfbd" and config.schedule.rounds >= 1
    assert config.policy is not None
    policy = load_policy(Path(config.policy))
    assert policy.resolve(policy.policy.output) == Path(config.data), "the pipeline trains on what its policy prepares"
    assert config.audit.config is not None
    resolve_audit_config(Path(config.audit.config), {})
    resolution = policy.policy.dataset.resolution
    channels = 1 if policy.policy.dataset.format == "digits" else 3
    assert set(config.model.attn_resolutions) <= {resolution >> i for i in range(len(config.model.channel_mult))}, \
        "attention at a resolution the U-Net has"
    torch.manual_seed(0)
    net = build_net(config, (channels, resolution, resolution)).eval()
    x = torch.randn(1, channels, resolution, resolution)
    with torch.no_grad():
        assert net(x, torch.ones(1)).shape == x.shape


def test_the_digits_pipeline_under_dp_needs_the_fixed_schedule_docs_dp_gives() -> None:
    """The default decides when SFBD's rounds start from held-back protected copies: refused with DP-SGD, naming
    the keys; docs/dp.md's command (those keys) loads, with the same 100 kimg budget; --method clean-only loads."""
    from sfbd_guard.errors import InputError

    digits = next(p for p in PIPELINES if p.stem == "digits")
    with pytest.raises(InputError, match=r"schedule\.pretrain_until=kimg"):
        load_pipeline(digits, {"privacy": {"epsilon": 10}})
    fixed = load_pipeline(digits, {"privacy": {"epsilon": 10}, "schedule.pretrain_until": "kimg",
                                   "schedule.pretrain_kimg": 40, "schedule.round_kimg": 20})
    assert fixed.schedule.budget_kimg() == load_pipeline(digits).schedule.budget_kimg() == 100
    dp_doc = (digits.parents[1] / "docs" / "dp.md").read_text()
    assert "--set schedule.pretrain_until=kimg --set schedule.pretrain_kimg=40 --set schedule.round_kimg=20" in dp_doc
    assert load_pipeline(digits, {"method": "clean-only"}).schedule.budget_kimg() == 100
