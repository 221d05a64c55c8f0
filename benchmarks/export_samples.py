"""Do diffusers' samples of an exported model match `guard sample` of the same run? (issue 30)

A run trained with `network: diffusers-unet2d` (e.g. `guard run` of pipelines/digits.yaml with that key) is exported;
diffusers' own classes (UNet2DModel, EDMEulerScheduler: first-order Euler steps) draw --n images, and `guard sample`'s
sampler (EDM's Heun steps) draws --n images twice, with other seeds. The test: the Fréchet distance between the
diffusers set and a guard set, against the distance between the two guard sets (what two draws of one sampler differ
by), in pixel space and in the features of quality.py's digit classifier. Also writes the two grids side by side.

    python benchmarks/export_samples.py --run runs/digits --ledger guard-ledger --json r.json \
        --png docs/img/export-diffusers-vs-guard.png
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from image_sets import digits
from PIL import Image, ImageDraw
from quality import features, frechet_distance, train_scorer

import sfbd_guard as guard
from sfbd_guard.engine.data import from_uint8, to_uint8


def diffusers_draw(folder: Path, n: int, steps: int, seed: int, shape: tuple[int, int, int], batch: int = 500) -> torch.Tensor:
    """The card's usage snippet, batched: uint8 (n, C, H, W)."""
    from diffusers import EDMEulerScheduler, UNet2DModel

    unet = UNet2DModel.from_pretrained(folder, subfolder="unet").eval()
    scheduler = EDMEulerScheduler.from_pretrained(folder, subfolder="scheduler")
    generator = torch.Generator().manual_seed(seed)
    parts = []
    for start in range(0, n, batch):
        scheduler.set_timesteps(steps)
        x = torch.randn((min(batch, n - start), *shape), generator=generator) * scheduler.init_noise_sigma
        with torch.no_grad():
            for t in scheduler.timesteps:
                x = scheduler.step(unet(scheduler.scale_model_input(x, t), t).sample, t, x).prev_sample
        parts.append(to_uint8(x.clamp(-1, 1)))
    return torch.cat(parts)


def grid(images: torch.Tensor, title: str, scale: int = 6, columns: int = 8) -> Image.Image:
    images = images[: columns * columns, 0].numpy()
    size = images.shape[-1] * scale
    canvas = Image.new("L", (columns * (size + 2) + 2, columns * (size + 2) + 24), 255)
    for i, image in enumerate(images):
        tile = Image.fromarray(image).resize((size, size), Image.Resampling.NEAREST)
        canvas.paste(tile, (2 + (i % columns) * (size + 2), 22 + (i // columns) * (size + 2)))
    ImageDraw.Draw(canvas).text((4, 4), title, fill=0)
    return canvas


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a run trained with network: diffusers-unet2d")
    parser.add_argument("--ledger", type=Path, default=None)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--euler-steps", type=int, nargs="*", default=[18, 40])
    parser.add_argument("--heun-steps", type=int, nargs="*", default=[],
                        help="also draw guard sample with these step counts: its own discretisation error at 18 steps")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--png", type=Path)
    args = parser.parse_args(argv)
    results: dict[str, Any] = {"run": args.run.name, "n": args.n}
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "export"
        guard.export(args.run, out=out, ledger=args.ledger)
        run = guard.load_run(args.run)
        started = time.perf_counter()
        first, second = run.sample(args.n, seed=0), run.sample(args.n, seed=10**6)
        results["guard_seconds_per_draw"] = round((time.perf_counter() - started) / 2, 1)
        heun = {steps: run.sample(args.n, seed=2 * 10**6, steps=steps) for steps in args.heun_steps}
        theirs = {}
        for steps in args.euler_steps:
            started = time.perf_counter()
            theirs[steps] = diffusers_draw(out, args.n, steps, seed=1, shape=run.shape)
            results[f"diffusers_{steps}_seconds"] = round(time.perf_counter() - started, 1)
    pixels = digits()
    labels = __import__("sklearn.datasets", fromlist=["load_digits"]).load_digits().target
    scorer = train_scorer(from_uint8(torch.from_numpy(pixels)).numpy(), labels, 10)

    def spaces(images: torch.Tensor) -> dict[str, np.ndarray]:
        return {"pixels": images.reshape(len(images), -1).double().numpy(),
                "features": features(scorer, from_uint8(images))}

    a, b = spaces(first), spaces(second)
    for space in ("pixels", "features"):
        row = {"guard_vs_guard": frechet_distance(a[space], b[space])}
        for steps, images in theirs.items():
            row[f"diffusers_euler{steps}_vs_guard"] = frechet_distance(spaces(images)[space], a[space])
        for steps, images in heun.items():
            row[f"guard_heun{steps}_vs_guard"] = frechet_distance(spaces(images)[space], a[space])
        results[space] = row
        print(space, json.dumps(row), flush=True)
    if args.png:
        left = grid(first, "guard sample (Heun, 18 steps)")
        shown = 40 if 40 in theirs else max(theirs)  # the card's snippet's steps
        right = grid(theirs[shown], f"diffusers EDMEulerScheduler ({shown} steps)")
        canvas = Image.new("L", (left.width + right.width + 12, left.height), 255)
        canvas.paste(left, (0, 0))
        canvas.paste(right, (left.width + 12, 0))
        args.png.parent.mkdir(parents=True, exist_ok=True)
        canvas.save(args.png, optimize=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
