"""The run's state besides weights and generators, typed: one record per owner, saved in every checkpoint.

    RunInfo
      entered_phase   the trainer: the phase entered last (a resume re-enters it, a new phase is entered afresh)
      pretrain        the trainer: `schedule.pretrain_until: converged`'s checks and the end it decided
      validation      the trainer: SFBD's validation measure before each round and at the end, the best so far
      round_set       the SFBD rounds (sfbd.py): the round set being trained on, and the sha256 of its shards
      denoised_floor  the SFBD rounds: the noise floor that round set is trained with
      bank            online SFBD (sfbd.py): where the bank's refresh stands
      privacy         the DP accountant (privacy.py): the plan it counts for, its history, steps and epsilon so far

In the checkpoint (state.safetensors' JSON, `info`) the records keep the flat keys they always had, so a run
resumes from a checkpoint written before they were typed; a damaged or foreign value is refused naming its key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import InputError


@dataclass
class PretrainRecord:
    """`schedule.pretrain_until: converged`: each check's [kimg, validation loss], the next check, the decided end."""

    checks: list[list[float]] = field(default_factory=list)
    next_check_kimg: float | None = None
    end_kimg: float | None = None  # where pretraining ended, once decided


@dataclass
class ValidationRecord:
    """The measures of the validation (validation.py) before each round and at the end."""

    history: list[dict[str, Any]] = field(default_factory=list)  # before, kimg, loss, round_psnr, decision
    best: dict[str, Any] | None = None  # before, kimg, loss, round_psnr of the best model so far
    denoiser_psnr: float | None = None  # the estimated PSNR of the round set the model now in place makes


@dataclass
class RoundRecord:
    """The round set a round trains on: a resume inside the round maps exactly these shards."""

    round: int
    shards: dict[str, str]  # file name → sha256


@dataclass
class BankRecord:
    """Online SFBD's bank: the next record to re-denoise, and the step the online phase started at."""

    cursor: int
    start_step: int


@dataclass
class PrivacyAccount:
    """DP-SGD's accountant (privacy.py): what it was planned for, and what the run has spent so far."""

    target_epsilon: float
    delta: float
    accountant: str  # Opacus' accountant: rdp or prv
    max_grad_norm: float
    noise_multiplier: float
    sample_rate: float  # the planned accounting rate (the largest if private phases differ)
    planned_steps: int
    protected_records: int
    stages: list[str]  # the private stages
    steps: int = 0  # private steps taken
    epsilon: float = 0.0  # spent, as of the end of the last private phase left
    history: list[list[float]] = field(default_factory=list)  # [noise_multiplier, sample_rate, steps], in order
    phases: list[dict[str, Any]] = field(default_factory=list)  # phase, steps, epsilon when it was left

    def to_json(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in PRIVACY_KEYS}

    @classmethod
    def from_json(cls, value: dict[str, Any], where: str) -> PrivacyAccount:
        number = (int, float)
        kinds: dict[str, type | tuple[type, ...]] = {
            "target_epsilon": number, "delta": number, "accountant": str, "max_grad_norm": number,
            "noise_multiplier": number, "sample_rate": number, "planned_steps": int, "protected_records": int,
            "stages": list, "steps": int, "epsilon": number, "history": list, "phases": list}
        for key, kind in kinds.items():
            if not isinstance(value.get(key), kind) or isinstance(value.get(key), bool):
                raise InputError(f"{where}: state.info.privacy.{key} is {value.get(key)!r:.60}, expected "
                                 f"{getattr(kind, '__name__', 'number')}")
        history = value["history"]
        if not all(isinstance(h, list) and len(h) == 3 and all(isinstance(x, number) for x in h) for h in history):
            raise InputError(f"{where}: state.info.privacy.history is not a list of [noise_multiplier, sample_rate, "
                             "steps]")
        return cls(**{key: value[key] for key in PRIVACY_KEYS})


PRIVACY_KEYS = tuple(PrivacyAccount.__dataclass_fields__)


@dataclass
class RunInfo:
    entered_phase: int | None = None
    pretrain: PretrainRecord = field(default_factory=PretrainRecord)
    validation: ValidationRecord | None = None
    round_set: RoundRecord | None = None
    denoised_floor: float | None = None
    bank: BankRecord | None = None
    privacy: PrivacyAccount | None = None  # shared with privacy.PrivateTraining, which counts into it

    def to_json(self) -> dict[str, Any]:
        """The checkpoint's `info` object (the flat keys of earlier checkpoints; absent records are left out)."""
        info: dict[str, Any] = {}
        if self.entered_phase is not None:
            info["entered_phase"] = self.entered_phase
        if self.pretrain.checks:
            info["pretrain_checks"] = self.pretrain.checks
        if self.pretrain.next_check_kimg is not None:
            info["next_check_kimg"] = self.pretrain.next_check_kimg
        if self.pretrain.end_kimg is not None:
            info["pretrain_end_kimg"] = self.pretrain.end_kimg
        if self.validation is not None:
            info["validation"] = {"history": self.validation.history, **(
                {"best": self.validation.best} if self.validation.best is not None else {}),
                **({"denoiser_psnr": self.validation.denoiser_psnr} if self.validation.denoiser_psnr is not None else {})}
        if self.round_set is not None:
            info["round_set"] = {"round": self.round_set.round, "shards": self.round_set.shards}
        if self.denoised_floor is not None:
            info["denoised_floor"] = self.denoised_floor
        if self.bank is not None:
            info["bank_cursor"], info["online_start_step"] = self.bank.cursor, self.bank.start_step
        if self.privacy is not None:
            info["privacy"] = self.privacy.to_json()
        return info

    @classmethod
    def from_json(cls, info: dict[str, Any], where: str) -> RunInfo:
        """The records of a checkpoint's `info`, each value checked (an InputError names `where` and the key)."""

        def get(key: str, kind: type | tuple[type, ...]) -> Any:
            value = info.get(key)
            if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
                raise InputError(f"{where}: state.info.{key} is {value!r:.60}, expected {getattr(kind, '__name__', kind)}")
            return value

        number = (int, float)
        checks = get("pretrain_checks", list) or []
        if not all(isinstance(c, list) and len(c) == 2 and all(isinstance(x, number) for x in c) for c in checks):
            raise InputError(f"{where}: state.info.pretrain_checks is not a list of [kimg, loss] pairs")
        validation = get("validation", dict)
        round_set = get("round_set", dict)
        if round_set is not None and not (isinstance(round_set.get("round"), int) and isinstance(round_set.get("shards"), dict)):
            raise InputError(f"{where}: state.info.round_set needs round (integer) and shards (object)")
        cursor, start = get("bank_cursor", int), get("online_start_step", int)
        if (cursor is None) != (start is None):
            raise InputError(f"{where}: state.info.bank_cursor and state.info.online_start_step go together (one is missing)")
        history = validation.get("history", []) if validation is not None else []
        best, psnr = (validation.get("best"), validation.get("denoiser_psnr")) if validation is not None else (None, None)
        best_ok = best is None or (isinstance(best, dict) and isinstance(best.get("before"), str)
                                   and isinstance(best.get("loss"), number) and isinstance(best.get("round_psnr"), number))
        if not isinstance(history, list) or not best_ok or (psnr is not None and not isinstance(psnr, number)):
            raise InputError(f"{where}: state.info.validation needs history (list), best (object: before, loss, "
                             "round_psnr) and denoiser_psnr (number)")
        next_check, end = get("next_check_kimg", number), get("pretrain_end_kimg", number)
        floor = get("denoised_floor", number)
        privacy = get("privacy", dict)
        return cls(entered_phase=get("entered_phase", int),
                   pretrain=PretrainRecord([[float(k), float(v)] for k, v in checks],
                                           None if next_check is None else float(next_check),
                                           None if end is None else float(end)),
                   validation=None if validation is None else ValidationRecord(history, best, psnr),
                   round_set=None if round_set is None else RoundRecord(round_set["round"], dict(round_set["shards"])),
                   denoised_floor=None if floor is None else float(floor),
                   bank=None if cursor is None else BankRecord(cursor, start),
                   privacy=None if privacy is None else PrivacyAccount.from_json(privacy, where))
