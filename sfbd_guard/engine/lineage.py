"""Where a run's weights came from: `init` (`guard train --init RUN`) starts a run from another run's EMA weights, or
from weights imported with `guard import-weights` (a root of the lineage, recorded as the user declared it).

The new run's run.json records its lineage: the parent (its run directory, the weights file, their sha256, the
prepared data it trained on, its method) followed by the parent's own lineage, so every generation lists all of
its ancestors. `start_from` loads the parent's weights into the new network and its EMA, refusing an architecture
that differs (naming the keys). guard verify checks the chain (compliance/lineage checks).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from ..contracts.run_record import LineageLink, read_run_record
from ..errors import InputError
from ..hashing import sha256_file
from ..rundir import IMPORT_RECORD, IMPORT_WEIGHTS, RunPaths

if TYPE_CHECKING:
    import torch

    from ..contracts.import_record import ImportRecord
    from .config import InitSpec

MAX_GENERATIONS = 64  # a longer chain is refused (a cycle written by hand would never end)


def init_weights(init: InitSpec) -> Path:
    """The EMA weights file `init` names: its checkpoint's, else the run's latest."""
    from .checkpoint import ema_weights_file

    run = Path(init.run)
    if not run.is_dir():
        raise InputError(f"init.run {run}: not a run directory", hint="--init takes a directory written by guard train")
    if is_import(run):
        return run / IMPORT_WEIGHTS
    return ema_weights_file(run, Path(init.checkpoint) if init.checkpoint else None)


def lineage_of(init: InitSpec, image_shape: tuple[int, int, int]) -> list[LineageLink]:
    """The lineage of a run started from `init`: the parent, then the parent's own lineage (its run.json)."""
    from ..config import load_config
    from .config import PipelineConfig

    run = Path(init.run).resolve()
    if is_import(run):  # weights from outside: a root, as declared
        if init.checkpoint:
            raise InputError(f"init.checkpoint: {run} holds imported weights, one file; drop init.checkpoint")
        return [_import_link(run)]
    record = read_run_record(run)
    if record.shape != image_shape:
        raise InputError(f"init.run {run}: trained on {record.shape} images, this data holds {image_shape}",
                         hint="start from a run of the same resolution and channels")
    weights = init_weights(init).resolve()
    parent = LineageLink(run=str(run), weights=str(weights), weights_sha256=sha256_file(weights),
                         data_fingerprint=record.data_fingerprint,
                         method=load_config(PipelineConfig, RunPaths(run).resolved).method)
    chain = [parent, *record.lineage]
    if len(chain) > MAX_GENERATIONS:
        raise InputError(f"init.run {run}: a lineage of more than {MAX_GENERATIONS} generations")
    return chain


def start_from(weights: Path, net: torch.nn.Module, ema: torch.nn.Module, sha256: str) -> None:
    """The parent's EMA weights into `net` and `ema`: the file whose sha256 the lineage records (a file changed since is
    refused), of the same architecture (another is refused naming the keys)."""
    from safetensors.torch import load_file

    if not weights.is_file() or sha256_file(weights) != sha256:
        raise InputError(f"init {weights}: {'missing' if not weights.is_file() else 'not the weights file the lineage records'}"
                         f" (sha256 {sha256[:16]}…)", hint="restore the parent run's checkpoint, or start a new run")

    try:
        tensors = load_file(weights)
    except Exception as err:  # noqa: BLE001 (safetensors raises its own SafetensorError for a damaged file)
        raise InputError(f"init {weights}: cannot read the weights ({str(err).splitlines()[0] if str(err) else err})") from None
    mine = net.state_dict()
    missing = sorted(set(mine) - set(tensors))
    extra = sorted(set(tensors) - set(mine))
    shaped = sorted(k for k in set(mine) & set(tensors) if tuple(mine[k].shape) != tuple(tensors[k].shape))
    if missing or extra or shaped:
        parts = [f"{what}: {', '.join(keys[:4])}{' …' if len(keys) > 4 else ''} ({len(keys)})"
                 for what, keys in (("missing in the init", missing), ("not in this model", extra),
                                    ("other shapes", shaped)) if keys]
        raise InputError(f"init {weights}: another architecture than this pipeline's model: {'; '.join(parts)}",
                         hint="start from a run whose model section (channels, blocks, attention) is this pipeline's")
    net.load_state_dict(tensors)
    ema.load_state_dict(tensors)


SPDX = re.compile(r"^[A-Za-z0-9.+-]+(?: (?:AND|OR|WITH) [A-Za-z0-9.+-]+)*$")


def import_weights(file: Path, out: Path, *, licence: str, source: str) -> ImportRecord:
    """Weights trained elsewhere, as a root of lineages: `file` (safetensors only: no pickle is ever read) copied to
    `out`/ema.safetensors with import.json saying what the user declared (licence, source), which nothing verifies."""
    from safetensors import safe_open

    from ..contracts.import_record import ImportRecord, write_import_record
    from ..fileio import atomic_write_bytes

    if not SPDX.match(licence):
        raise InputError(f"--licence {licence!r}: not an SPDX licence expression", hint="e.g. CC-BY-4.0, MIT, Apache-2.0")
    if not source.strip():
        raise InputError("--source: say where the weights come from")
    if file.suffix != ".safetensors" or not file.is_file():
        raise InputError(f"{file}: not a .safetensors file", hint="weights come in as safetensors only (no pickles)")
    try:
        with safe_open(file, framework="pt") as handle:
            tensors = len(list(handle.keys()))
    except Exception as err:  # noqa: BLE001 (safetensors raises its own SafetensorError for a damaged file)
        raise InputError(f"{file}: cannot read it as safetensors ({str(err).splitlines()[0] if str(err) else err})") from None
    if tensors == 0:
        raise InputError(f"{file}: holds no tensor")
    if out.exists() and any(out.iterdir()):
        raise InputError(f"--out {out}: not empty", hint="import into a new folder")
    out.mkdir(parents=True, exist_ok=True)
    data = file.read_bytes()
    atomic_write_bytes(out / IMPORT_WEIGHTS, data)
    record = ImportRecord(weights_sha256=sha256_file(out / IMPORT_WEIGHTS), licence=licence, source=source.strip(),
                          original=str(file.resolve()), tensors=tensors,
                          imported_at=datetime.now(UTC).isoformat(timespec="seconds"))
    write_import_record(out, record)
    return record


def is_import(folder: Path) -> bool:
    return (folder / IMPORT_RECORD).is_file()


def _import_link(folder: Path) -> LineageLink:
    from ..contracts.import_record import read_import_record

    record = read_import_record(folder)
    weights = (folder / IMPORT_WEIGHTS).resolve()
    if not weights.is_file() or sha256_file(weights) != record.weights_sha256:
        raise InputError(f"init.run {folder}: {IMPORT_WEIGHTS} is not the file import.json records",
                         hint="import the weights again with guard import-weights")
    return LineageLink(run=str(folder.resolve()), weights=str(weights), weights_sha256=record.weights_sha256,
                       data_fingerprint=None, method=None,
                       declared={"licence": record.licence, "source": record.source})
