"""Hostile or broken inputs end in one line on stderr, exit 2 and a `failed` ledger event, never a traceback.

Each case below damages one file of a real prepared directory, run directory or sample folder (made once
through the CLI) and runs the command that reads it.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import digits_policy, read_events, tiny_pipeline, write_policy


@dataclass(frozen=True)
class Base:
    """A prepared digits directory, a tiny trained run and 8 samples of it (never modified by a case)."""

    root: Path

    @property
    def prepared(self) -> Path:
        return self.root / "prepared"

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def samples(self) -> Path:
        return self.root / "samples"


def make_base(root: Path, guard: Callable[..., int]) -> Base:
    root.mkdir(parents=True, exist_ok=True)
    write_policy(root / "policy.yaml", digits_policy(root / "prepared", drop=0.8))
    write_policy(root / "pipeline.yaml", tiny_pipeline(root / "prepared", root / "run"))
    assert guard("prepare", "--policy", root / "policy.yaml") == 0
    assert guard("train", "--pipeline", root / "pipeline.yaml") == 0
    assert guard("sample", "--run", root / "run", "--n", 8, "--out", root / "samples", "--steps", 2) == 0
    return Base(root)


def _copy_run(base: Base, tmp: Path) -> Path:
    return Path(shutil.copytree(base.run, tmp / "run", symlinks=True))


def _latest(run: Path) -> Path:
    return run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()


def _truncate(path: Path, keep: int | None = None) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: keep if keep is not None else len(data) // 2])


def _safetensors_with_metadata(path: Path, metadata: dict[str, str] | None) -> None:
    """Rewrite a safetensors file's header metadata, keeping its tensors."""
    data = path.read_bytes()
    size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + size])
    header.pop("__metadata__", None)
    if metadata is not None:
        header["__metadata__"] = metadata
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + size :])


def _state_meta(run: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(_latest(run) / "state.safetensors", framework="pt") as handle:
        return dict(handle.metadata())


def _edit_state(run: Path, edit: Callable[[dict], None]) -> None:
    meta = _state_meta(run)
    state = json.loads(meta["state"])
    edit(state)
    _safetensors_with_metadata(_latest(run) / "state.safetensors", {**meta, "state": json.dumps(state)})


def _resume(run: Path) -> list[object]:
    return ["train", "--resume", run]


def _sample(run: Path, tmp: Path, *extra: object) -> list[object]:
    return ["sample", "--run", run, "--n", 2, "--steps", 2, "--out", tmp / "drawn", *extra]


def _audit(base: Base, tmp: Path, samples: Path, data: Path | None = None) -> list[object]:
    return ["audit", "--samples", samples, "--data", data or base.prepared, "--report", tmp / "report"]


def _samples(base: Base, tmp: Path) -> Path:
    return Path(shutil.copytree(base.samples, tmp / "samples"))


def _prepared(base: Base, tmp: Path) -> Path:
    return Path(shutil.copytree(base.prepared, tmp / "prepared"))


def _bomb_png(path: Path, side: int) -> None:
    """A valid-header grayscale PNG of side × side whose pixel data would take side² bytes to decode."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    row = b"\x00" * (side + 1)
    squeeze = zlib.compressobj(9)
    data = b"".join(squeeze.compress(row) for _ in range(64)) + squeeze.flush()  # only the first rows: never decoded
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data) + chunk(b"IEND", b""))


def _run_json(run: Path, edit: Callable[[dict], object] | str) -> None:
    if isinstance(edit, str):
        (run / "run.json").write_text(edit)
        return
    info = json.loads((run / "run.json").read_text())
    result = edit(info)
    (run / "run.json").write_text(json.dumps(info if result is None else result))


def _case_latest_outside(base: Base, tmp: Path, target: str) -> list[object]:
    run = _copy_run(base, tmp)
    outside = tmp / "outside"
    shutil.copytree(_latest(run), outside / "step-000000008")
    (run / "checkpoints" / "latest").write_text(target.format(outside=outside))
    return _resume(run)


def _case_latest_symlink(base: Base, tmp: Path, command: str) -> list[object]:
    run = _copy_run(base, tmp)
    outside = Path(shutil.copytree(_latest(run), tmp / "outside-step"))
    shutil.rmtree(_latest(run))
    os.symlink(outside, run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip())
    return _resume(run) if command == "train" else _sample(run, tmp)


def _case_samples_json(base: Base, tmp: Path, text: str) -> list[object]:
    samples = _samples(base, tmp)
    (samples / "samples.json").write_text(text.replace("{outside}", str(base.samples / "000000.png")))
    return _audit(base, tmp, samples)


def _case_done(base: Base, tmp: Path, which: str) -> list[object]:
    root = Path(shutil.copytree(base.root, tmp / "base", symlinks=True,
                               ignore=shutil.ignore_patterns("ledger")))
    pipeline = write_policy(root / "p.yaml", tiny_pipeline(root / "prepared", root / "run", policy=str(root / "policy.yaml"),
                                                           sample={"n": 4, "steps": 2}))
    shutil.copytree(root / "samples", root / "run" / "samples")
    (root / "run" / "audit").mkdir()
    marker = json.loads((root / "run" / "samples" / "samples.json").read_text())
    del marker
    if which == "samples":
        (root / "run" / "samples" / "done.json").write_text("{not json")
    elif which == "audit":
        (root / "run" / "samples" / "done.json").write_text("{}")
        (root / "run" / "audit" / "done.json").write_text('["copies"]')
    else:
        (root / "prepared" / "card.json").write_text("{broken")
    return ["run", pipeline]


# (id, build(base, tmp) -> argv, a fragment the error line must contain)
CASES: list[tuple[str, Callable[[Base, Path], list[object]], str]] = [
    # checkpoints: truncated, garbage, wrong metadata
    ("sample-ema-truncated", lambda b, t: (_truncate(_latest(r := _copy_run(b, t)) / "ema.safetensors"), _sample(r, t))[1],
     "ema.safetensors"),
    ("sample-ema-garbage", lambda b, t: ((_latest(r := _copy_run(b, t)) / "ema.safetensors").write_bytes(b"\xff" * 64),
                                         _sample(r, t))[1], "ema.safetensors"),
    ("sample-ema-empty", lambda b, t: ((_latest(r := _copy_run(b, t)) / "ema.safetensors").write_bytes(b""),
                                       _sample(r, t))[1], "ema.safetensors"),
    ("sample-checkpoint-file-truncated",
     lambda b, t: (shutil.copy(_latest(b.run) / "ema.safetensors", t / "w.safetensors"), _truncate(t / "w.safetensors", 20),
                   _sample(b.run, t, "--checkpoint", t / "w.safetensors"))[2], "w.safetensors"),
    ("sample-checkpoint-dir-garbage",
     lambda b, t: (shutil.copytree(_latest(b.run), t / "ck"), (t / "ck" / "ema.safetensors").write_bytes(b"{}" * 8),
                   _sample(b.run, t, "--checkpoint", t / "ck"))[2], "ema.safetensors"),
    ("resume-net-truncated", lambda b, t: (_truncate(_latest(r := _copy_run(b, t)) / "net.safetensors"), _resume(r))[1],
     "net.safetensors"),
    ("resume-ema-truncated", lambda b, t: (_truncate(_latest(r := _copy_run(b, t)) / "ema.safetensors", 9), _resume(r))[1],
     "ema.safetensors"),
    ("resume-state-truncated", lambda b, t: (_truncate(_latest(r := _copy_run(b, t)) / "state.safetensors"), _resume(r))[1],
     "state.safetensors"),
    ("resume-state-missing", lambda b, t: ((_latest(r := _copy_run(b, t)) / "state.safetensors").unlink(), _resume(r))[1],
     "state.safetensors"),
    ("resume-state-no-metadata",
     lambda b, t: (_safetensors_with_metadata(_latest(r := _copy_run(b, t)) / "state.safetensors", None), _resume(r))[1],
     "state.safetensors"),
    ("resume-state-metadata-not-json",
     lambda b, t: (_safetensors_with_metadata(_latest(r := _copy_run(b, t)) / "state.safetensors",
                                              {**_state_meta(r), "state": "{oops"}), _resume(r))[1], "state.safetensors"),
    ("resume-state-step-not-int", lambda b, t: (_edit_state(r := _copy_run(b, t), lambda s: s.update(step="eight")),
                                                _resume(r))[1], "state.safetensors"),
    ("resume-state-missing-key", lambda b, t: (_edit_state(r := _copy_run(b, t), lambda s: s.pop("optimizer")),
                                               _resume(r))[1], "state.safetensors"),
    ("resume-state-bad-optimizer", lambda b, t: (_edit_state(r := _copy_run(b, t),
                                                             lambda s: s["optimizer"].update(param_groups=[])),
                                                 _resume(r))[1], "state.safetensors"),
    # the `latest` pointer
    ("latest-dotdot", lambda b, t: _case_latest_outside(b, t, "../../outside/step-000000008"), "latest"),
    ("latest-absolute", lambda b, t: _case_latest_outside(b, t, "{outside}/step-000000008"), "latest"),
    ("latest-symlink-out-train", lambda b, t: _case_latest_symlink(b, t, "train"), "latest"),
    ("latest-symlink-out-sample", lambda b, t: _case_latest_symlink(b, t, "sample"), "latest"),
    ("latest-missing-step", lambda b, t: ((r := _copy_run(b, t)) and (r / "checkpoints" / "latest").write_text("step-000000099"),
                                          _resume(r))[1], "latest"),
    ("latest-not-utf8", lambda b, t: ((r := _copy_run(b, t)) and (r / "checkpoints" / "latest").write_bytes(b"\xff\xfe"),
                                      _resume(r))[1], "latest"),
    # run.json
    ("run-json-invalid-resume", lambda b, t: (_run_json(r := _copy_run(b, t), "{not json"), _resume(r))[1], "run.json"),
    ("run-json-invalid-sample", lambda b, t: (_run_json(r := _copy_run(b, t), "{not json"), _sample(r, t))[1], "run.json"),
    ("run-json-invalid-verify", lambda b, t: (_run_json(r := _copy_run(b, t), "{not json"), ["verify", "--run", r])[1], "run.json"),
    ("run-json-list", lambda b, t: (_run_json(r := _copy_run(b, t), "[1, 2]"), _resume(r))[1], "run.json"),
    ("run-json-no-shape", lambda b, t: (_run_json(r := _copy_run(b, t), lambda i: i.pop("image_shape")), _sample(r, t))[1],
     "run.json"),
    ("run-json-shape-type", lambda b, t: (_run_json(r := _copy_run(b, t), lambda i: i.update(image_shape="abc")),
                                          _sample(r, t))[1], "run.json"),
    ("run-json-no-fingerprint", lambda b, t: (_run_json(r := _copy_run(b, t), lambda i: i.pop("data_fingerprint")),
                                              _resume(r))[1], "run.json"),
    ("run-json-missing-resume", lambda b, t: ((r := _copy_run(b, t)) and (r / "run.json").unlink(), _resume(r))[1],
     "run.json"),
    ("run-json-missing-sample", lambda b, t: ((r := _copy_run(b, t)) and (r / "run.json").unlink(), _sample(r, t))[1],
     "run.json"),
    ("datasheet-run-json-invalid", lambda b, t: (_run_json(r := _copy_run(b, t), "{not json"),
                                                 ["report", "--datasheet", t / "d.md", "--run", r])[1], "run.json"),
    ("datasheet-card-invalid", lambda b, t: (_run_json(r := _copy_run(b, t), lambda i: i.update(data=str(_prepared(b, t)))),
                                             (t / "prepared" / "card.json").write_text("[]"),
                                             ["report", "--datasheet", t / "d.md", "--run", r])[2], "card.json"),
    # config.resolved.yaml
    ("resolved-yaml-invalid", lambda b, t: ((r := _copy_run(b, t)) and (r / "config.resolved.yaml").write_text("a: [\n"),
                                            _resume(r))[1], "config.resolved.yaml"),
    ("resolved-yaml-wrong-type", lambda b, t: ((r := _copy_run(b, t)) and (r / "config.resolved.yaml").write_text("batch: x\n"),
                                               _resume(r))[1], "config.resolved.yaml"),
    # card.json as the audit reads it
    ("audit-card-invalid", lambda b, t: ((p := _prepared(b, t)) and (p / "card.json").write_text("{"),
                                         _audit(b, t, b.samples, p))[1], "card.json"),
    ("audit-card-resolution-type", lambda b, t: ((p := _prepared(b, t)) and (p / "card.json").write_text(json.dumps(
        {**json.loads((p / "card.json").read_text()), "resolution": "eight"})), _audit(b, t, b.samples, p))[1], "card.json"),
    ("audit-card-files-list", lambda b, t: ((p := _prepared(b, t)) and (p / "card.json").write_text(json.dumps(
        {**json.loads((p / "card.json").read_text()), "files": ["x"]})), _audit(b, t, b.samples, p))[1], "card.json"),
    # samples.json and the sample folder
    ("samples-json-invalid", lambda b, t: _case_samples_json(b, t, "{not json"), "samples.json"),
    ("samples-json-list", lambda b, t: _case_samples_json(b, t, "[1]"), "samples.json"),
    ("samples-json-images-type", lambda b, t: _case_samples_json(b, t, '{"images": 5}'), "samples.json"),
    ("samples-json-absolute", lambda b, t: _case_samples_json(b, t, '{"images": ["{outside}"]}'), "samples.json"),
    ("samples-json-dotdot", lambda b, t: _case_samples_json(b, t, '{"images": ["../samples/000000.png"]}'), "samples.json"),
    ("samples-json-missing-file", lambda b, t: _case_samples_json(b, t, '{"images": ["nope.png"]}'), "nope.png"),
    # guard run's markers and the prepared card
    ("run-samples-done-invalid", lambda b, t: _case_done(b, t, "samples"), "done.json"),
    ("run-audit-done-invalid", lambda b, t: _case_done(b, t, "audit"), "done.json"),
    ("run-card-invalid", lambda b, t: _case_done(b, t, "card"), "card.json"),
]

# Commands that write no ledger event (read-only views of the ledger).
UNRECORDED = ("report", "verify")  # read-only commands record no event


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Base:
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("robust-base")
    env = {**os.environ, "GUARD_LEDGER": str(root / "ledger")}

    def guard(*args: object) -> int:
        return subprocess.run([sys.executable, "-m", "sfbd_guard.cli", *map(str, args)], env=env, check=False).returncode

    return make_base(root, guard)


@pytest.mark.parametrize("build, fragment", [pytest.param(b, f, id=i) for i, b, f in CASES])
def test_broken_input_is_one_line_exit_2_and_a_failed_event(cli, tmp_path: Path, base: Base, _isolated_ledger: Path,
                                                            build: Callable[[Base, Path], list[object]], fragment: str) -> None:  # type: ignore[no-untyped-def]
    work = tmp_path / "case"
    work.mkdir()
    shutil.copytree(base.root / "ledger" / "prepare", _isolated_ledger / "prepare")  # the base's provenance
    argv = build(base, work)
    result = cli(*argv)
    assert result.code == 2, (result.code, result.err)
    lines = result.err.strip().splitlines()
    assert "Traceback" not in result.err and len(lines) <= 2 and lines[0].startswith("error: "), result.err
    assert len(lines) == 1 or lines[1].startswith("hint: "), result.err
    assert fragment in lines[0], result.err
    if argv[0] not in UNRECORDED:
        events = read_events(_isolated_ledger)
        assert events is not None, "no ledger event"
        failed = [e for e in events.to_pylist() if e["status"] == "failed"]
        assert failed and json.loads(failed[-1]["summary"])["error"] in result.err, events.to_pylist()


def test_audit_pixel_bomb_is_an_error_row_named_in_the_report(cli, tmp_path: Path, base: Base) -> None:  # type: ignore[no-untyped-def]
    """A 47000² PNG (2.2 gigapixels) is refused from its header, before any decoding, as that sample's error."""
    import pyarrow.parquet as pq

    samples = _samples(base, tmp_path)
    _bomb_png(samples / "bomb.png", 47_000)
    result = cli(*_audit(base, tmp_path, samples))
    assert result.code == 0, result.err
    assert "Traceback" not in result.err
    rows = {r["sample"]: r for r in pq.read_table(tmp_path / "report" / "samples.parquet").to_pylist()}
    assert rows["bomb.png"]["status"] == "error" and "bomb.png" in rows["bomb.png"]["error"]
    assert "pixel budget" in rows["bomb.png"]["error"]
    assert json.loads((tmp_path / "report" / "summary.json").read_text())["counts"]["error"] == 1
