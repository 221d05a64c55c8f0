"""Cost of the clip dedup embedding per `transforms` setting: each variant is one more forward pass.

No CLIP weights can be downloaded here, so this times a random open_clip model (the architecture, not the
weights, sets the cost): a tiny one by default (as the tests use), or `--width/--layers` for a larger one.
The ratios between settings are what carries over to real weights; the milliseconds do not.

    PYTHONPATH=. python benchmarks/dedup_clip_cost.py [--images 512] [--json benchmarks/results/dedup_clip_cost.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

SETTINGS = ((), ("flip",), ("flip", "rotate", "invert"))


def tiny_model(folder: Path, width: int, layers: int) -> Path:
    """A random open_clip model saved as an open_clip directory (config + safetensors)."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    config = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": layers, "width": width, "patch_size": 8,
                                              "head_width": 16},
              "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}}
    (folder / "configs").mkdir()
    (folder / "configs" / "guard-bench-clip.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder / "configs")
    torch.manual_seed(0)
    model = open_clip.create_model("guard-bench-clip").eval()
    weights = folder / "model"
    weights.mkdir()
    (weights / "open_clip_config.json").write_text(json.dumps({"model_cfg": config, "preprocess_cfg": {"size": 32}}))
    save_file(model.state_dict(), str(weights / "open_clip_model.safetensors"))
    return weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from sfbd_guard.curation.dedup import Embedding

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (args.images, 3, 32, 32), dtype=np.uint8)
    result: dict[str, object] = {"images": args.images, "width": args.width, "layers": args.layers, "threads": 1}
    with tempfile.TemporaryDirectory() as name:
        weights = tiny_model(Path(name), args.width, args.layers)
        per_image = {}
        for transforms in SETTINGS:
            embed = Embedding("clip", 0, 0, transforms, str(weights)).embedder()
            embed(pixels[:64])  # warm-up
            best = float("inf")
            for _ in range(3):
                start = time.perf_counter()
                embed(pixels)
                best = min(best, time.perf_counter() - start)
            per_image[",".join(transforms) or "none"] = round(best / args.images * 1000, 3)
    result["ms_per_image"] = per_image
    result["ratio_to_flip"] = {k: round(v / per_image["flip"], 2) for k, v in per_image.items()}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
