"""Policy files: the schema is a contract, and every problem names the file, the key path and the value."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import celeba_policy, write_policy
from sfbd_guard.errors import ConfigError
from sfbd_guard.policy.model import load_policy

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["celeba", "cifar10", "digits", "imagefolder-licenses"])
def test_shipped_policies_validate(name: str) -> None:
    loaded = load_policy(REPO / "policies" / f"{name}.yaml")
    assert loaded.policy.version == 1
    assert loaded.policy.rules[-1].where is None, "shipped policies end with a catch-all rule"


def test_shipped_settings_match_the_papers() -> None:
    celeba = load_policy(REPO / "policies" / "celeba.yaml").policy
    cifar = load_policy(REPO / "policies" / "cifar10.yaml").policy
    assert (celeba.noise.sigma, celeba.dataset.resolution) == (1.3824, 64)
    assert celeba.rules[0].action == "exclude" and celeba.rules[1].sample.by == "identity"
    assert celeba.rules[1].sample.fraction == 0.1
    assert (cifar.noise.sigma, cifar.dataset.resolution, cifar.rules[0].sample.fraction) == (0.59, 32, 0.04)


def _problem(tmp_path: Path, policy: dict) -> str:
    path = write_policy(tmp_path / "bad.yaml", policy)
    with pytest.raises(ConfigError) as info:
        load_policy(path)
    message = str(info.value)
    assert message.startswith(str(path)), message
    return message


def test_unknown_key_is_named_with_a_suggestion(tmp_path: Path) -> None:
    policy = celeba_policy(tmp_path, tmp_path / "out")
    policy["noise"] = {"sigma": 0.5, "key_fle": "k"}
    message = _problem(tmp_path, policy)
    assert "noise.key_fle: unknown key (did you mean key_file?)" in message


def test_a_public_noise_seed_is_refused_with_the_reason(tmp_path: Path) -> None:
    policy = celeba_policy(tmp_path, tmp_path / "out")
    policy["noise"] = {"sigma": 0.5, "seed": 0}
    message = _problem(tmp_path, policy)
    assert "noise: seed is no longer accepted" in message and "guard keygen" in message


def test_wrong_type_is_named(tmp_path: Path) -> None:
    policy = celeba_policy(tmp_path, tmp_path / "out")
    policy["dataset"]["resolution"] = "64"
    message = _problem(tmp_path, policy)
    assert "dataset.resolution" in message and "'64'" in message


@pytest.mark.parametrize(
    ("change", "key"),
    [
        (lambda p: p["noise"].update(sigma=0), "noise.sigma"),
        (lambda p: p["noise"].update(sigma=-1.0), "noise.sigma"),
        (lambda p: p["rules"][0]["sample"].update(fraction=1.5), "rules[0].sample.fraction"),
        (lambda p: p["rules"][0]["sample"].update(fraction=0), "rules[0].sample.fraction"),
        (lambda p: p["rules"][0]["sample"].update(count=3), "rules[0].sample"),
        (lambda p: p["rules"][1].update(action="keep"), "rules[1].action"),
        (lambda p: p["dataset"].update(format="mnist"), "dataset.format"),
        (lambda p: p.update(version=2), "version"),
        (lambda p: p["rules"].append({"name": "licensed", "action": "protect"}), "rules"),
    ],
)
def test_bad_values_are_named(tmp_path: Path, change, key: str) -> None:  # type: ignore[no-untyped-def]
    policy = celeba_policy(tmp_path, tmp_path / "out")
    change(policy)
    assert f": {key}" in _problem(tmp_path, policy)


def test_missing_key_and_bad_yaml(tmp_path: Path) -> None:
    policy = celeba_policy(tmp_path, tmp_path / "out")
    del policy["noise"]
    assert "noise: required key is missing" in _problem(tmp_path, policy)
    broken = tmp_path / "broken.yaml"
    broken.write_text("version: 1\nrules: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_policy(broken)
