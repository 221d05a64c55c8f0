"""Write an export folder (`guard export --run RUN --out DIR`).

Only weights a train event of the ledger recorded leave: the run's EMA weights file must have the sha256 that a
finished training of this run wrote into the ledger. Every file is written anew from those weights and the ledger
(nothing is copied from the run directory), into a temporary folder beside DIR that becomes DIR when it holds
exactly the allow-list of exporting/layout.py. Re-running into a DIR that holds this export of these weights
(checked file by file) writes nothing and returns it, so a failed `--push` is simply run again.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..compliance.cards import hub_licence, model_card_text
from ..compliance.check import trainings
from ..compliance.composition import licence_counts, trained_licences
from ..contracts.events import read_events
from ..contracts.export_record import ExportedFile, ExportRecord, SamplerSettings, write_export_record
from ..contracts.run_record import read_run_record
from ..errors import InputError
from ..fileio import atomic_write_bytes
from ..hashing import sha256_file
from ..locations import project_of
from ..prepared.relocate import prepared_of_run
from .check import checked_export
from .layout import CARD, FILES, LICENCE, NETWORK_CONFIG, NETWORK_WEIGHTS, RECORD, SCHEDULER_CONFIG, UNET_CONFIG, Format
from .usage import licence_text, usage_snippet

if TYPE_CHECKING:
    import torch

SPDX_OR_OTHER = r"[A-Za-z0-9.+-]+( (AND|OR|WITH) [A-Za-z0-9.+-]+)*"
SAMPLE_STEPS = 18  # guard sample's default


def recorded_weights(run_dir: Path, weights: Path, ledger: Path) -> tuple[str, str]:
    """The id of the ledger's train event of `run_dir` that recorded `weights`, and their sha256; else an input
    error."""
    digest = sha256_file(weights)
    events = trainings(read_events(ledger), run_dir, project_of(ledger))
    for event in reversed(events):
        if any(a.sha256 == digest for a in event.artifacts("outputs", "ema")):
            return event.event_id, digest
    raise InputError(f"{weights}: no finished training of {run_dir} in the ledger {ledger} recorded these weights",
                     hint="export the weights a training ended with (the run's latest checkpoint), with the ledger "
                          "that training wrote to (--ledger)")


def _same_export(out: Path, run_dir: Path, event_id: str, licence: str | None) -> ExportRecord | None:
    """The export already in `out` when it is this run's export of these weights (every file checked), else None."""
    if not (out / RECORD).is_file() or out.is_symlink():
        return None
    existing = checked_export(out)
    same = existing.run == run_dir.name and existing.train_event == event_id and licence in (None, existing.licence)
    return existing if same else None


def _empty_target(out: Path) -> None:
    if out.is_symlink() or (out.exists() and (not out.is_dir() or any(out.iterdir()))):
        raise InputError(f"--out {out}: exists and is not an empty folder", hint="export into a new folder")


def _write_network(folder: Path, net: torch.nn.Module, fmt: Format, shape: tuple[int, int, int],
                   config_dict: dict[str, object]) -> None:
    from safetensors.torch import save_file

    from ..diffusion.diffusers_unet import unet_of
    from ..engine.generate import SIGMA_MAX, SIGMA_MIN

    if fmt == "diffusers":
        from diffusers import EDMEulerScheduler

        unet_of(net).save_pretrained(folder / Path(UNET_CONFIG).parent, safe_serialization=True)
        scheduler: Any = EDMEulerScheduler(  # type: ignore[no-untyped-call]  # (diffusers is not typed throughout)
            sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, sigma_data=0.5, sigma_schedule="karras", rho=7.0,
            prediction_type="epsilon")
        scheduler.save_pretrained(folder / Path(SCHEDULER_CONFIG).parent)
        return
    (folder / NETWORK_CONFIG).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(folder / NETWORK_CONFIG, (json.dumps(
        {"network": "ddpmpp", "unet": config_dict, "image_shape": list(shape), "sigma_data": 0.5},
        indent=2, sort_keys=True) + "\n").encode())
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(folder / NETWORK_WEIGHTS),
              metadata={"format": "sfbd_guard", "network": "ddpmpp"})


def _files_of(folder: Path) -> list[str]:
    found = []
    for path in sorted(folder.rglob("*")):
        if path.is_symlink():
            raise InputError(f"{path}: a symbolic link in an export")  # never made by this writer
        if path.is_file():
            found.append(path.relative_to(folder).as_posix())
    return found


def export_run(run_dir: Path, out: Path, *, ledger: Path, checkpoint: Path | None = None, licence: str | None = None,
               data: Path | None = None) -> ExportRecord:
    """Write `run_dir`'s EMA model to the new folder `out` (the format its network loads in), with its model card,
    licence and export.json. `licence`: the model's SPDX licence; default the training data's one licence (else
    "other")."""
    from ..diffusion.networks import UNetConfig
    from ..engine.checkpoint import ema_weights_file, load_weights
    from ..engine.generate import SIGMA_MAX, SIGMA_MIN
    from ..engine.service import pipeline_of_run
    from ..engine.trainer import build_net, unet_config
    from ..prepared.card import read_card

    run_dir = run_dir.resolve()
    record = read_run_record(run_dir)
    config = pipeline_of_run(run_dir)
    weights = ema_weights_file(run_dir, checkpoint)
    event_id, weights_sha256 = recorded_weights(run_dir, weights, ledger)
    if licence is not None and not re.fullmatch(SPDX_OR_OTHER, licence):
        raise InputError(f"--licence {licence!r}: not an SPDX licence expression", hint="e.g. CC-BY-4.0, MIT, other")
    folder = prepared_of_run(run_dir, record.data, record.data_fingerprint, project_of(ledger), data)
    card = read_card(folder, hint="the run's prepared directory (run.json `data`, or --data) must be written by guard prepare")
    trained = trained_licences(licence_counts(folder))
    model_licence = licence or hub_licence(trained)[0]
    fmt: Format = "diffusers" if config.network == "diffusers-unet2d" else "sfbd_guard"
    out = out.absolute()
    done = _same_export(out, run_dir, event_id, licence)
    if done is not None:  # a re-run (e.g. after a failed push): the folder is already this export
        return done
    _empty_target(out)
    out.parent.mkdir(parents=True, exist_ok=True)

    net = build_net(config, record.shape).eval()
    load_weights(weights, net)
    shape = (record.shape[0], record.shape[1], record.shape[2])
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        cfg: UNetConfig = unet_config(config)
        _write_network(staging, net, fmt, shape, {**asdict(cfg), "channel_mult": list(cfg.channel_mult),
                                                  "attn_resolutions": list(cfg.attn_resolutions)})
        usage = usage_snippet(fmt, shape)
        atomic_write_bytes(staging / CARD, model_card_text(run_dir, ledger, data, usage=usage, licence=model_licence,
                                                           library="diffusers" if fmt == "diffusers" else "sfbd_guard").encode())
        atomic_write_bytes(staging / LICENCE, licence_text(model_licence, trained, card.policy_name).encode())
        names = _files_of(staging)
        unexpected = sorted(set(names) - set(FILES[fmt]))
        if unexpected:  # a library wrote more than the layout knows: nothing leaves that was not listed
            raise InputError(f"export: unexpected files {unexpected}; the allow-list is exporting/layout.py")
        export = ExportRecord(
            format=fmt, network=config.network, run=run_dir.name, method=config.method, image_shape=list(shape),
            weights_sha256=weights_sha256, train_event=event_id, data_fingerprint=record.data_fingerprint,
            licence=model_licence,
            sampler=SamplerSettings(sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rho=7.0, sigma_data=0.5, steps=SAMPLE_STEPS),
            files=[ExportedFile(path=name, sha256=sha256_file(staging / name), bytes=(staging / name).stat().st_size)
                   for name in names if name != RECORD],
            exported_at=datetime.now(UTC).isoformat(timespec="seconds"))
        write_export_record(staging, export)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return export  # owner-only, as every report (mkdtemp): publishing it is the owner's step (--push)
