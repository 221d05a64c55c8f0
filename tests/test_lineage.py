"""`init`: a run started from another run's EMA weights (engine/lineage.py), and the lineage its run.json records.

- the new run starts from the parent's EMA weights exactly; three generations list their ancestors in order;
- SFBD on data with no clean record: refused without an init, trained with one (the first round denoises with the
  parent's model);
- a crash in the first round of such a run, resumed: the uninterrupted result, bit for bit;
- another architecture is one line, exit 2, naming the differing keys.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import digits_policy, key_file, tiny_pipeline, write_policy
from sfbd_guard.curation.prepare import prepare
from sfbd_guard.engine.config import load_pipeline
from sfbd_guard.engine.service import train
from sfbd_guard.policy.model import load_policy

SFBD = {"pretrain_kimg": 0, "rounds": 2, "round_kimg": 0.032, "pretrain_until": "kimg"}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The digits with 10 % clean (`mixed`), and the same policy with no clean rule (`protected`)."""
    tmp = tmp_path_factory.mktemp("lineage")
    found = {}
    for name, clean in (("mixed", True), ("protected", False)):
        policy = digits_policy(tmp / name, drop=0.85)
        policy["name"] = f"digits-{name}"
        if not clean:
            policy["rules"] = [r for r in policy["rules"] if r["action"] != "clean"]
        policy["noise"]["key_file"] = str(key_file(tmp / "keys"))
        found[name] = prepare(load_policy(write_policy(tmp / f"{name}.yaml", policy))).output
    return found


@pytest.fixture(scope="module")
def parent(data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny clean-only run on the mixed digits: the parent the init tests start from."""
    return train(_config(tmp_path_factory.mktemp("parent"), data["mixed"], "parent"), resume=False).run_dir


@pytest.fixture(scope="module")
def straight(parent: Path, data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SFBD from `parent` on data with no clean record, uninterrupted."""
    return train(_config(tmp_path_factory.mktemp("straight"), data["protected"], "straight", **_from(parent)),
                 resume=False).run_dir


def _from(parent: Path) -> dict[str, object]:
    return {"method": "sfbd", "schedule": SFBD, "init": {"run": str(parent)}, "checkpoint_every": 1}


def _config(tmp_path: Path, data: Path, name: str, **overrides: object):  # type: ignore[no-untyped-def]
    return load_pipeline(write_policy(tmp_path / f"{name}.yaml", tiny_pipeline(data, tmp_path / name, **overrides)))


def _ema(run: Path) -> dict[str, torch.Tensor]:
    latest = (run / "checkpoints" / "latest").read_text().strip()
    return load_file(run / "checkpoints" / latest / "ema.safetensors")


def test_a_run_starts_from_its_parent_and_three_generations_list_their_ancestors(
        tmp_path: Path, data: dict[str, Path], parent: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sfbd_guard.engine import lineage

    started: dict[str, torch.Tensor] = {}
    real = lineage.start_from

    def spy(weights: Path, net: torch.nn.Module, ema: torch.nn.Module, sha256: str) -> None:
        real(weights, net, ema, sha256)
        started.update({k: v.clone() for k, v in net.state_dict().items()})
        assert all(torch.equal(v, ema.state_dict()[k]) for k, v in net.state_dict().items())

    monkeypatch.setattr(lineage, "start_from", spy)
    child = train(_config(tmp_path, data["mixed"], "b", init={"run": str(parent)}), resume=False).run_dir
    assert started and all(torch.equal(started[k], v) for k, v in _ema(parent).items())  # the parent's EMA, exactly
    grandchild = train(_config(tmp_path, data["protected"], "c", method="sfbd", schedule=SFBD,
                               init={"run": str(child)}), resume=False).run_dir
    from sfbd_guard.contracts.run_record import read_run_record
    from sfbd_guard.hashing import sha256_file

    chain = read_run_record(grandchild).lineage
    assert [Path(link.run) for link in chain] == [child.resolve(), parent.resolve()]
    for link in chain:
        assert sha256_file(Path(link.weights)) == link.weights_sha256 and link.method == "clean-only"
    assert chain[0].data_fingerprint == json.loads((data["mixed"] / "card.json").read_text())["fingerprint"]
    assert read_run_record(child).lineage == chain[1:]
    online = train(_config(tmp_path, data["protected"], "d", method="online-sfbd", init={"run": str(child)},
                           schedule={"pretrain_kimg": 0, "total_kimg": 0.064, "refresh_every": 2, "refresh_size": 32}),
                   resume=False)  # online SFBD likewise: no clean record, the bank denoised by the init's model
    assert online.step == 4 and (online.run_dir / "bank" / "bank.npy").is_file()


def test_sfbd_without_clean_records_needs_an_init(tmp_path: Path, data: dict[str, Path], cli) -> None:  # type: ignore[no-untyped-def]
    pipeline = write_policy(tmp_path / "p.yaml", tiny_pipeline(data["protected"], tmp_path / "none", method="sfbd",
                                                               schedule={"pretrain_kimg": 0.064, "rounds": 1,
                                                                         "round_kimg": 0.032, "pretrain_until": "kimg"}))
    result = cli("train", "--pipeline", pipeline, "--allow-unrecorded")
    assert result.code == 2 and "no clean records to pretrain sfbd on" in result.err and "--init" in result.err
    zero = write_policy(tmp_path / "z.yaml", tiny_pipeline(data["protected"], tmp_path / "zero", method="sfbd",
                                                           schedule=SFBD))
    result = cli("train", "--pipeline", zero, "--allow-unrecorded")
    assert result.code == 2 and "schedule.pretrain_kimg: 0" in result.err and "init" in result.err


@pytest.mark.parametrize("at_step", [0, 1])  # 0: and before any checkpoint was written (the run starts again from its init)
def test_a_crash_in_the_first_round_of_an_init_run_resumes_exactly(tmp_path: Path, data: dict[str, Path], parent: Path,
                                                                     straight: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     at_step: int) -> None:
    overrides = _from(parent)
    from sfbd_guard.engine import trainer as module

    real_step = module.Trainer.train_step

    def crash(self, mixture, phase):  # type: ignore[no-untyped-def]
        if self.state.step == at_step:
            raise KeyboardInterrupt
        real_step(self, mixture, phase)

    config = _config(tmp_path, data["protected"], "crashed", **overrides)
    monkeypatch.setattr(module.Trainer, "train_step", crash)
    with pytest.raises(KeyboardInterrupt):
        train(config, resume=False)
    monkeypatch.undo()
    assert (tmp_path / "crashed" / "rounds" / "round-01").is_dir(), "killed inside round 1"
    if at_step == 0:  # as if killed before its first checkpoint
        shutil.rmtree(tmp_path / "crashed" / "checkpoints")
    resumed = train(config, resume=True)
    assert resumed.step == int((straight / "checkpoints" / "latest").read_text().strip().split("-")[1])
    for name, tensor in _ema(straight).items():
        assert torch.equal(tensor, _ema(resumed.run_dir)[name]), name


def test_another_architecture_is_refused_naming_the_keys(tmp_path: Path, data: dict[str, Path], parent: Path, cli) -> None:  # type: ignore[no-untyped-def]
    wider = tiny_pipeline(data["mixed"], tmp_path / "wide")
    wider["model"] = {**wider["model"], "model_channels": 8}
    pipeline = write_policy(tmp_path / "wide.yaml", wider)
    result = cli("train", "--pipeline", pipeline, "--init", parent, "--allow-unrecorded")
    assert result.code == 2 and "another architecture" in result.err and "other shapes" in result.err
    assert "Traceback" not in result.err


def test_the_privacy_budget_is_composed_over_ancestors_that_saw_this_owners_protected_data() -> None:
    from sfbd_guard.compliance.cards import _composed_words
    from sfbd_guard.compliance.lineage import AncestorPrivacy
    from sfbd_guard.contracts.run_record import LineageLink

    def ancestor(method: str, same: bool, epsilon: float | None) -> AncestorPrivacy:
        link = LineageLink(run=f"/runs/{method}", weights="/w", weights_sha256="0" * 64, data_fingerprint="f",
                           method=method)
        return AncestorPrivacy(link, same, epsilon, 1e-5 if epsilon is not None else None)

    assert _composed_words((2.0, 1e-5), [ancestor("clean-only", True, None)]) == ""  # saw no protected record
    assert _composed_words((2.0, 1e-5), [ancestor("sfbd", False, None)]) == ""  # another owner's data
    both = _composed_words((2.0, 1e-5), [ancestor("sfbd", True, 3.0), ancestor("ambient", True, 1.5)])
    assert "ε = 6.5" in both and "δ = 3e-05" in both and "3 generations" in both
    assert "no DP guarantee holds" in _composed_words((2.0, 1e-5), [ancestor("noisy-direct", True, None)])
    assert "no guarantee over the chain" in _composed_words(None, [ancestor("sfbd", True, 3.0)])


def test_the_near_search_finds_an_ancestors_slightly_changed_copy_of_a_protected_original() -> None:
    import numpy as np
    from sklearn.datasets import load_digits

    from sfbd_guard.compliance.lineage import _near

    digits = np.clip(np.round(load_digits().images / 16 * 255), 0, 255).astype(np.uint8)[:, None]
    protected, others = digits[:200], digits[200:400]
    ids = [f"p-{i}" for i in range(200)]

    def originals():  # type: ignore[no-untyped-def]
        yield ids[:100], protected[:100]
        yield ids[100:], protected[100:]

    assert _near([f"c-{i}" for i in range(200)], others, originals)[0] == "PASS"
    changed = others.copy()
    changed[17] = np.clip(protected[150].astype(int) + np.random.default_rng(0).integers(-3, 4, (1, 8, 8)), 0, 255)
    verdict, words = _near([f"c-{i}" for i in range(200)], changed, originals)
    assert verdict == "FAIL" and "p-150 ~ its c-17" in words
