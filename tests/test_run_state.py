"""The run's typed state (engine/state.py): it round-trips through the checkpoint's JSON with the keys earlier
checkpoints used, and a damaged or foreign value is refused naming its key."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sfbd_guard.engine.state import (
    BankRecord,
    PretrainRecord,
    PrivacyAccount,
    RoundRecord,
    RunInfo,
    ValidationRecord,
)
from sfbd_guard.errors import InputError

finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
counts = st.integers(min_value=0, max_value=10**9)
sha = st.text("0123456789abcdef", min_size=64, max_size=64)
infos = st.builds(
    RunInfo,
    entered_phase=st.none() | counts,
    pretrain=st.builds(PretrainRecord, checks=st.lists(st.lists(finite, min_size=2, max_size=2), max_size=4),
                       next_check_kimg=st.none() | finite, end_kimg=st.none() | finite),
    validation=st.none() | st.builds(ValidationRecord,
                                     history=st.lists(st.fixed_dictionaries({"before": st.text(max_size=8), "loss": finite}),
                                                      max_size=3),
                                     best=st.none() | st.fixed_dictionaries({"before": st.text(max_size=8), "loss": finite,
                                                                             "round_psnr": finite}),
                                     denoiser_psnr=st.none() | finite),
    round_set=st.none() | st.builds(RoundRecord, round=counts, shards=st.dictionaries(st.text(max_size=12), sha, max_size=3)),
    denoised_floor=st.none() | finite,
    bank=st.none() | st.builds(BankRecord, cursor=counts, start_step=counts),
    privacy=st.none() | st.builds(
        PrivacyAccount, target_epsilon=finite, delta=finite, accountant=st.sampled_from(["rdp", "prv"]),
        max_grad_norm=finite, noise_multiplier=finite, sample_rate=finite, planned_steps=counts,
        protected_records=counts, stages=st.lists(st.sampled_from(["train", "rounds", "online"]), max_size=2),
        steps=counts, epsilon=finite, history=st.lists(st.tuples(finite, finite, counts).map(list), max_size=3),
        phases=st.lists(st.fixed_dictionaries({"phase": st.text(max_size=8), "steps": counts, "epsilon": finite}),
                        max_size=2)),
)
ACCOUNT = {"target_epsilon": 8.0, "delta": 1e-5, "accountant": "rdp", "max_grad_norm": 1.0, "noise_multiplier": 1.1,
           "sample_rate": 0.01, "planned_steps": 100, "protected_records": 500, "stages": ["rounds"], "steps": 3,
           "epsilon": 0.5, "history": [[1.1, 0.01, 3]], "phases": [{"phase": "round-1", "steps": 3, "epsilon": 0.5}]}


@given(infos)
def test_the_state_round_trips_through_the_checkpoint_json(info: RunInfo) -> None:
    saved = json.loads(json.dumps(info.to_json()))  # as state.safetensors stores it
    assert RunInfo.from_json(saved, "ckpt") == info


def test_the_checkpoint_keys_are_those_earlier_checkpoints_used() -> None:
    """An oracle written out by hand: the flat keys of the checkpoints written before the state was typed."""
    info = RunInfo(entered_phase=2, pretrain=PretrainRecord([[2.0, 0.5]], 4.0, 6.0),
                   validation=ValidationRecord([{"before": "round-1"}], {"before": "round-1", "loss": 0.5, "round_psnr": 21.5},
                                               21.5),
                   round_set=RoundRecord(1, {"part-00000.npy": "a" * 64}), denoised_floor=0.1,
                   bank=BankRecord(64, 10), privacy=PrivacyAccount(**ACCOUNT))  # type: ignore[arg-type]
    assert info.to_json() == {
        "entered_phase": 2, "pretrain_checks": [[2.0, 0.5]], "next_check_kimg": 4.0, "pretrain_end_kimg": 6.0,
        "validation": {"history": [{"before": "round-1"}], "best": {"before": "round-1", "loss": 0.5, "round_psnr": 21.5},
                       "denoiser_psnr": 21.5},
        "round_set": {"round": 1, "shards": {"part-00000.npy": "a" * 64}}, "denoised_floor": 0.1,
        "bank_cursor": 64, "online_start_step": 10, "privacy": ACCOUNT}
    assert RunInfo().to_json() == {}


@pytest.mark.parametrize(("info", "named"), [
    ({"entered_phase": "1"}, "entered_phase"),
    ({"entered_phase": True}, "entered_phase"),
    ({"round_set": "round-01"}, "round_set"),
    ({"round_set": {"round": 1}}, "round_set"),
    ({"pretrain_checks": [[1.0]]}, "pretrain_checks"),
    ({"bank_cursor": 3}, "bank_cursor"),
    ({"validation": {"history": {}}}, "validation"),
    ({"validation": {"history": [], "best": {"before": "round-1"}}}, "validation"),
    ({"privacy": [1, 2]}, "privacy"),
    ({"privacy": {**ACCOUNT, "steps": "3"}}, "privacy.steps"),
    ({"privacy": {**ACCOUNT, "history": [[1.1, 0.01]]}}, "privacy.history"),
    ({"privacy": {k: v for k, v in ACCOUNT.items() if k != "delta"}}, "privacy.delta"),
    ({"denoised_floor": "0.1"}, "denoised_floor"),
])
def test_a_damaged_value_is_refused_naming_its_key(info: dict[str, object], named: str) -> None:
    with pytest.raises(InputError, match=f"ckpt/state.safetensors: state.info.{named}"):
        RunInfo.from_json(info, "ckpt/state.safetensors")
