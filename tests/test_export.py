"""`guard export`: a run's model in diffusers' layout (network diffusers-unet2d) or ours, loadable outside the tool.

- the diffusers export loads with diffusers' own classes, and its EDMEulerScheduler runs the very Euler steps of
  our sampler on the same weights (trajectories equal to float precision);
- statistically, diffusers' Euler samples are as close to `guard sample`'s Heun samples as two draws of
  `guard sample` are to each other (a Fréchet distance in pixel space), and a wrongly configured scheduler is not;
- our network's export loads with `load_exported` and samples bit-identically to the run;
- the model card carries a usage snippet that runs as written; push uploads exactly the listed files (a fake API);
- bad input is one line, exit 2.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import sfbd_guard as api
from helpers import digits_policy, guard, key_file, tiny_pipeline, write_policy
from sfbd_guard.contracts.events import read_events
from sfbd_guard.errors import InputError
from sfbd_guard.exporting.layout import FILES


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Prepared digits (60 % dropped) and two tiny clean-only runs recorded in one ledger: diffusers' U-Net and ours."""
    tmp = tmp_path_factory.mktemp("export")
    ledger = tmp / "ledger"
    policy = digits_policy(tmp / "prepared", drop=0.6)
    policy["noise"]["key_file"] = str(key_file(tmp / "keys"))
    api.prepare(write_policy(tmp / "policy.yaml", policy), ledger=ledger)
    out: dict[str, Path] = {"ledger": ledger, "data": tmp / "prepared"}
    for network in ("diffusers-unet2d", "ddpmpp"):
        run = tmp / "runs" / network
        pipeline = tiny_pipeline(tmp / "prepared", run, network=network, schedule={"pretrain_kimg": 0.512})
        api.train(write_policy(tmp / f"{network}.yaml", pipeline), ledger=ledger)
        out[network] = run
    return out


def files_of(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def diffusers_euler(folder: Path, x: torch.Tensor, steps: int, **scheduler_changes: Any) -> torch.Tensor:
    from diffusers import EDMEulerScheduler, UNet2DModel

    unet = UNet2DModel.from_pretrained(folder, subfolder="unet").eval()
    scheduler = EDMEulerScheduler.from_pretrained(folder, subfolder="scheduler", **scheduler_changes)
    scheduler.set_timesteps(steps)
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(unet(scheduler.scale_model_input(x, t), t).sample, t, x).prev_sample
    return x


def test_the_diffusers_export_is_diffusers_layout_and_runs_our_euler_steps(runs: dict[str, Path], tmp_path: Path) -> None:
    from sfbd_guard.diffusion.sampling import karras_sigmas, sample_euler

    out = tmp_path / "export"
    record = api.export(runs["diffusers-unet2d"], out=out, ledger=runs["ledger"])
    assert record.format == "diffusers" and files_of(out) == sorted(FILES["diffusers"])
    card = (out / "README.md").read_text()
    assert "library_name: diffusers" in card and "## Usage" in card and "## Lineage" in card
    assert "SPDX-License-Identifier:" in (out / "LICENSE").read_text()
    exported = json.loads((out / "export.json").read_text())
    assert {f["path"] for f in exported["files"]} == set(FILES["diffusers"]) - {"export.json"}

    # the same starting noise, the same 12 Karras steps: diffusers' scheduler and our Euler sampler agree
    x = torch.randn((6, 1, 8, 8), generator=torch.Generator().manual_seed(3)) * 80.0
    theirs = diffusers_euler(out, x.clone(), 12)
    net = api.load_run(runs["diffusers-unet2d"]).net
    ours = sample_euler(net, x.clone(), karras_sigmas(12, 0.002, 80.0))
    assert torch.allclose(theirs, ours.to(theirs.dtype), atol=2e-3), (theirs - ours).abs().max()

    event = read_events(runs["ledger"], "export")[-1]
    assert event.status == "ok" and event.summary.format == "diffusers"  # type: ignore[attr-defined]
    assert event.artifacts("inputs", "weights")[0].sha256 == record.weights_sha256


def fd(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance of two image sets in pixel space (0-255)."""
    from scipy import linalg

    x, y = (t.reshape(len(t), -1).double().numpy() for t in (a, b))
    cx, cy = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    return float(((x.mean(0) - y.mean(0)) ** 2).sum() + np.trace(cx + cy - 2 * linalg.sqrtm(cx @ cy).real))


def test_diffusers_samples_match_guard_sample_statistically(runs: dict[str, Path], tmp_path: Path) -> None:
    """FD(diffusers' Euler, 40 steps; guard sample) ≤ 1.5 × FD(two guard sample draws), at 240 images each; a scheduler
    told the wrong parametrisation (v-prediction, 120 images, 20 steps) is far off: the test can tell a mismatch
    (measured: 0.95–1.03× and 34–57× at 240–400 images)."""
    out = tmp_path / "export"
    api.export(runs["diffusers-unet2d"], out=out, ledger=runs["ledger"])
    n = 240
    run = api.load_run(runs["diffusers-unet2d"])
    first, second = run.sample(n, seed=0), run.sample(n, seed=10**6)
    noise = torch.randn((n, 1, 8, 8), generator=torch.Generator().manual_seed(7)) * 80.0
    theirs = ((diffusers_euler(out, noise.clone(), 40).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    wrong = ((diffusers_euler(out, noise[:120].clone(), 20, prediction_type="v_prediction").clamp(-1, 1) + 1) * 127.5).round()
    within, across, control = fd(first, second), fd(theirs, first), fd(wrong, first)
    assert across <= 1.5 * within, (across, within)
    assert control > 3 * within, (control, within)


def test_our_network_exports_and_loads_bit_identically(runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "export"
    record = api.export(runs["ddpmpp"], out=out, ledger=runs["ledger"], licence="CC-BY-4.0")
    assert record.format == "sfbd_guard" and files_of(out) == sorted(FILES["sfbd_guard"])
    assert "license: cc-by-4.0" in (out / "README.md").read_text().lower()
    model = api.load_exported(out)
    assert torch.equal(model.sample(8, seed=2, steps=6), api.load_run(runs["ddpmpp"]).sample(8, seed=2, steps=6))


def test_the_cards_usage_snippet_runs_as_written(runs: dict[str, Path], tmp_path: Path) -> None:
    for network in ("diffusers-unet2d", "ddpmpp"):
        out = tmp_path / network
        api.export(runs[network], out=out, ledger=runs["ledger"])
        code = re.search(r"```python\n(.*?)```", (out / "README.md").read_text(), re.S)
        assert code is not None
        scope: dict[str, Any] = {}
        exec(code.group(1).replace("path/to/export", str(out)), scope)
        assert scope["images"].shape == (16, 1, 8, 8) and scope["images"].dtype == torch.uint8


class FakeHub:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def create_repo(self, repo_id: str, **kwargs: Any) -> None:
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))

    def upload_folder(self, **kwargs: Any) -> Any:
        self.calls.append(("upload_folder", kwargs))
        return type("Commit", (), {"commit_url": f"https://huggingface.co/{kwargs['repo_id']}/commit/abc"})()


def test_push_uploads_exactly_the_listed_files_privately(runs: dict[str, Path], tmp_path: Path) -> None:
    from sfbd_guard.exporting.hub import push_export

    hub = FakeHub()
    out = tmp_path / "export"
    api.export(runs["ddpmpp"], out=out, ledger=runs["ledger"], push="me/digits", hub_api=hub)
    (name, create), (_, upload) = hub.calls
    assert name == "create_repo" and create["private"] is True and create["repo_id"] == "me/digits"
    assert sorted(upload["allow_patterns"]) == sorted(FILES["sfbd_guard"]) and Path(upload["folder_path"]) == out
    assert read_events(runs["ledger"], "export")[-1].summary.pushed.endswith("/commit/abc")  # type: ignore[attr-defined]

    (out / "extra.png").write_bytes(b"\x89PNG")  # added after the export: nothing is pushed
    with pytest.raises(InputError, match=r"does not list: extra\.png"):
        push_export(out, "me/digits", api=FakeHub())
    (out / "extra.png").unlink()
    with (out / "LICENSE").open("a") as handle:
        handle.write("changed")
    with pytest.raises(InputError, match=r"LICENSE is not the file export\.json records"):
        push_export(out, "me/digits", api=FakeHub())


def test_a_re_run_after_a_failed_push_pushes_the_same_folder(runs: dict[str, Path], tmp_path: Path) -> None:
    class Offline(FakeHub):
        def upload_folder(self, **kwargs: Any) -> Any:
            raise OSError("Network is unreachable")

    out = tmp_path / "export"
    with pytest.raises(OSError):
        api.export(runs["ddpmpp"], out=out, ledger=runs["ledger"], push="me/digits", hub_api=Offline())
    assert read_events(runs["ledger"], "export")[-1].status == "failed"
    written = {name: (out / name).stat().st_mtime_ns for name in files_of(out)}
    hub = FakeHub()
    api.export(runs["ddpmpp"], out=out, ledger=runs["ledger"], push="me/digits", hub_api=hub)
    assert [name for name, _ in hub.calls] == ["create_repo", "upload_folder"]
    assert {name: (out / name).stat().st_mtime_ns for name in files_of(out)} == written, "nothing written again"
    with pytest.raises(InputError, match="not an empty folder"):  # another licence: not this export
        api.export(runs["ddpmpp"], out=out, ledger=runs["ledger"], licence="MIT")


def test_bad_input_is_one_line_exit_2(runs: dict[str, Path], tmp_path: Path, cli) -> None:  # type: ignore[no-untyped-def]
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    result = cli("export", "--run", runs["ddpmpp"], "--out", busy, "--ledger", runs["ledger"])
    assert result.code == 2 and "not an empty folder" in result.err and "Traceback" not in result.err

    other = tmp_path / "other-ledger"  # weights no train event of this ledger recorded
    result = cli("export", "--run", runs["ddpmpp"], "--out", tmp_path / "e1", "--ledger", other)
    assert result.code == 2 and "recorded these weights" in result.err
    assert read_events(other, "export")[-1].status == "failed"

    copy = tmp_path / "copy"  # a run whose weights changed since its training ended
    shutil.copytree(runs["ddpmpp"], copy)
    weights = sorted((copy / "checkpoints").glob("step-*/ema.safetensors"))[-1]
    weights.write_bytes(weights.read_bytes()[:-4] + b"\x00\x00\x00\x00")
    assert guard("export", "--run", copy, "--out", tmp_path / "e2", "--ledger", runs["ledger"]) == 2
    assert not (tmp_path / "e2").exists() and not list(tmp_path.glob(".e2.*"))
