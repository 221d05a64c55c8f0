"""Checkpoints in safetensors (no pickles): net and EMA weights, plus the training state.

A checkpoint is a directory `checkpoints/step-NNNNNNNNN/` holding `net.safetensors`,
`ema.safetensors` and `state.safetensors` (optimizer tensors, generator states, small extra tensors)
with JSON metadata (step, images seen, phase, optimizer hyper-parameters), plus copies of the run's
files that change during training and must be captured as of the step (online SFBD's bank, `bank.npy`:
"attachments", their sha256 recorded in the state, so a swapped or truncated copy is refused on resume;
they go away with their checkpoint when it is pruned). It is written to a temporary sibling and renamed,
then `checkpoints/latest` is rewritten atomically, so a crash or kill -9 at any moment leaves the previous
checkpoint usable.
"""

from __future__ import annotations

import json
import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..errors import InputError
from ..fileio import atomic_write_bytes
from ..hashing import sha256_file
from ..rundir import RunPaths
from ..version import __version__
from .state import RunInfo

LATEST = "latest"


@dataclass
class TrainingState:
    """Everything besides the weights that a resumed run needs."""

    step: int = 0  # optimizer steps taken
    nimg: int = 0  # training images seen (global)
    phase: int = 0  # index of the phase of the method's plan
    round: int = 0  # SFBD round (0 = pretraining)
    info: RunInfo = field(default_factory=RunInfo)  # the typed records of the trainer, SFBD and DP (state.py)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # generator states, ...
    # files captured by the checkpoint loaded (name → its verified copy inside the checkpoint); see save_checkpoint
    attachments: dict[str, Path] = field(default_factory=dict)


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    for name, value in meta["scalars"].items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


_ATTACHMENT_NAME = re.compile(r"[a-z0-9_-]{1,40}\.npy")


def save_checkpoint(run_dir: Path, *, net: torch.nn.Module, ema: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    state: TrainingState, config_json: str, keep: int, attachments: dict[str, Path] | None = None) -> Path:
    """Write a checkpoint for `state.step` and point `latest` at it; keep the newest `keep`.

    `attachments`: name (e.g. bank.npy) → a file of the run as it is now; each is copied into the checkpoint
    and its sha256 recorded in the state."""
    root = RunPaths(run_dir).checkpoints
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{state.step:09d}"
    staging = root / f".{final.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    meta = {"tool_version": __version__, "config": config_json, "step": str(state.step)}
    save_file(_weights(net), staging / "net.safetensors", metadata=meta)
    save_file(_weights(ema), staging / "ema.safetensors", metadata=meta)
    opt_tensors, opt_meta = _optimizer_tensors(optimizer)
    tensors = {**opt_tensors, **{f"state.{k}": v.detach().cpu().contiguous() for k, v in state.tensors.items()}}
    copied = {}
    for name, source in sorted((attachments or {}).items()):
        if not _ATTACHMENT_NAME.fullmatch(name):
            raise ValueError(f"attachment name {name!r}")
        shutil.copyfile(source, staging / name)
        copied[name] = sha256_file(staging / name)
    info = {"step": state.step, "nimg": state.nimg, "phase": state.phase, "round": state.round, "info": state.info.to_json(),
            "optimizer": opt_meta, "attachments": copied}
    save_file(tensors, staging / "state.safetensors", metadata={"state": json.dumps(info), **meta})
    if final.exists():
        shutil.rmtree(final)
    staging.rename(final)
    atomic_write_bytes(root / LATEST, final.name.encode())
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


_STEP_NAME = re.compile(r"step-[0-9]{1,12}")


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint `checkpoints/latest` names; None when the run has none yet.

    The pointer must name a `step-N` directory directly inside the run's own `checkpoints/` folder:
    a pointer (or a checkpoint directory) that leads anywhere else, through `..`, an absolute path or
    a symlink, is refused, as is a pointer to a checkpoint that is not there (resuming from scratch
    next to a later checkpoint would silently lose the run).
    """
    root = RunPaths(run_dir).checkpoints
    pointer = root / LATEST
    if not pointer.exists() and not pointer.is_symlink():
        return None
    hint = "checkpoints/latest names the newest checkpoint folder of this run, e.g. step-000001000"
    if pointer.is_symlink() or not pointer.is_file():
        raise InputError(f"{pointer}: not a regular file (a symlink or folder cannot be a checkpoint pointer)", hint=hint)
    try:
        name = pointer.read_bytes().decode("utf-8").strip()
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"{pointer}: unreadable ({err})", hint=hint) from None
    if not _STEP_NAME.fullmatch(name):
        raise InputError(f"{pointer}: {name[:80]!r} is not a checkpoint folder of this run (expected step-N; "
                         "paths that lead elsewhere are refused)", hint=hint)
    path = root / name
    if root.is_symlink() or path.is_symlink() or not path.resolve().is_relative_to(run_dir.resolve()):
        raise InputError(f"{pointer}: {name} leads outside the run directory {run_dir} (symlink)", hint=hint)
    if not path.is_dir():
        raise InputError(f"{pointer}: names {name}, which is missing", hint=hint)
    if not (path / "state.safetensors").is_file():
        raise InputError(f"{path / 'state.safetensors'}: missing (the checkpoint {name} that latest names is incomplete)",
                         hint=hint)
    return path


def ema_weights_file(run_dir: Path, checkpoint: Path | None) -> Path:
    """The EMA weights of `run_dir`'s latest checkpoint, or of `checkpoint` (a checkpoint folder or a .safetensors)."""
    if checkpoint is None:
        latest = latest_checkpoint(run_dir)
        if latest is None:
            raise InputError(f"{run_dir}: no checkpoint yet", hint="train first, or pass --checkpoint FILE")
        return latest / "ema.safetensors"
    path = checkpoint / "ema.safetensors" if checkpoint.is_dir() else checkpoint
    if not path.is_file() or path.suffix != ".safetensors":
        raise InputError(f"--checkpoint {checkpoint}: not a .safetensors file or a checkpoint directory")
    return path


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def load_weights(path: Path, module: torch.nn.Module) -> None:
    """Load a safetensors state dict into `module`; a corrupt file or a mismatch is an input error naming the file."""
    try:
        tensors = load_file(path)
        module.load_state_dict(tensors)
    except Exception as err:  # noqa: BLE001 (safetensors raises its own SafetensorError for a damaged file)
        raise InputError(f"{path}: cannot load weights ({_first_line(err)})") from None


def _read_state(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The JSON state and the tensors of state.safetensors, checked for the keys and types a resume needs."""
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except Exception as err:  # noqa: BLE001 (a damaged file raises SafetensorError)
        raise InputError(f"{path}: cannot read the training state ({_first_line(err)})") from None
    if "state" not in metadata:
        raise InputError(f"{path}: no 'state' in the file's metadata (not a checkpoint written by guard train)")
    try:
        info = json.loads(metadata["state"])
    except json.JSONDecodeError as err:
        raise InputError(f"{path}: the 'state' metadata is not JSON ({err})") from None
    expected = {"step": int, "nimg": int, "phase": int, "round": int, "info": dict, "optimizer": dict}
    if not isinstance(info, dict):
        raise InputError(f"{path}: the 'state' metadata is {type(info).__name__}, expected an object")
    for key, kind in expected.items():
        value = info.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise InputError(f"{path}: state.{key} is {value!r}, expected {kind.__name__}")
        if isinstance(value, int) and value < 0:  # an int key (bools are refused above)
            raise InputError(f"{path}: state.{key} is {value}, expected >= 0")
    optimizer = info["optimizer"]
    if not isinstance(optimizer.get("param_groups"), list) or not isinstance(optimizer.get("scalars"), dict):
        raise InputError(f"{path}: state.optimizer needs param_groups (list) and scalars (object)")
    attachments = info.setdefault("attachments", {})  # none before checkpoints had attachments
    if not isinstance(attachments, dict) or not all(
            isinstance(k, str) and _ATTACHMENT_NAME.fullmatch(k) and isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v)
            for k, v in attachments.items()):
        raise InputError(f"{path}: state.attachments is not a map of file names (name.npy) to sha256 digests")
    return info, tensors


def _attachments(folder: Path, recorded: dict[str, str]) -> dict[str, Path]:
    """The checkpoint's attached files, each checked against the sha256 its state recorded at save time."""
    found = {}
    for name, digest in sorted(recorded.items()):
        path = folder / name
        if path.is_symlink() or not path.is_file():
            raise InputError(f"{path}: missing (the checkpoint's state records it with sha256 {digest[:16]}…)",
                             hint="restore the checkpoint folder whole, or resume from another checkpoint")
        if sha256_file(path) != digest:
            raise InputError(f"{path}: does not match the sha256 recorded in the checkpoint's state (changed or "
                             "truncated after it was saved)",
                             hint="restore the checkpoint folder whole, or resume from another checkpoint")
        found[name] = path
    return found


def load_checkpoint(path: Path, *, net: torch.nn.Module, ema: torch.nn.Module,
                    optimizer: torch.optim.Optimizer) -> TrainingState:
    """Restore weights, optimizer and training state; a damaged or foreign checkpoint is an input error
    naming the file."""
    load_weights(path / "net.safetensors", net)
    load_weights(path / "ema.safetensors", ema)
    state_file = path / "state.safetensors"
    info, tensors = _read_state(state_file)
    try:
        _restore_optimizer(optimizer, tensors, info["optimizer"])
    except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as err:
        raise InputError(f"{state_file}: the optimizer state does not fit this run ({_first_line(err)})") from None
    extra = {k.removeprefix("state."): v for k, v in tensors.items() if k.startswith("state.")}
    return TrainingState(info["step"], info["nimg"], info["phase"], info["round"],
                         RunInfo.from_json(info["info"], str(state_file)), extra,
                         _attachments(path, info["attachments"]))
