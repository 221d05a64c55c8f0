"""The `clip` embedder: open_clip image features from LOCAL weights only; nothing is ever downloaded.

Two ways to give weights (see docs/audit.md):
  * a file (.safetensors, .bin, .pt, .pth) plus the architecture name (`--clip-model ViT-B-32`),
    loaded through open_clip's file path (never a pretrained tag: the path is passed absolute);
  * a directory holding `open_clip_config.json` (model_cfg + preprocess_cfg) and a checkpoint,
    loaded with open_clip's `local-dir:` schema, which also keeps the right preprocessing.
`HF_HUB_OFFLINE=1` is set (unless already set) before open_clip is imported, as a second guard.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ..hashing import fingerprint, sha256_file
from .embed import normalize_rows

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
HOW_TO = ("pass --clip-weights FILE (.safetensors/.bin/.pt, with --clip-model ARCH) or a directory with "
          "open_clip_config.json and a checkpoint, or use --embedder pixel; weights are never downloaded")


def _checkpoints(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".pth") and p.is_file())


def check_weights(weights: str | None) -> Path:
    """The weights path, or exit 2 with the way to provide them."""
    if not weights:
        raise InputError("the clip embedder needs local weights and none are configured", hint=HOW_TO)
    path = Path(weights).expanduser().resolve()
    if path.is_dir():
        if not (path / "open_clip_config.json").is_file():
            raise InputError(f"--clip-weights {path}: directory without open_clip_config.json", hint=HOW_TO)
        if not _checkpoints(path):
            raise InputError(f"--clip-weights {path}: no .safetensors/.bin/.pth checkpoint in the directory", hint=HOW_TO)
        return path
    if not path.is_file():
        raise InputError(f"--clip-weights {path}: no such file or directory", hint=HOW_TO)
    if path.suffix not in WEIGHT_SUFFIXES:
        raise InputError(f"--clip-weights {path}: expected one of {', '.join(WEIGHT_SUFFIXES)}", hint=HOW_TO)
    return path


def _weights_digest(path: Path) -> str:
    if path.is_file():
        return sha256_file(path)

    return fingerprint({p.name: sha256_file(p) for p in [path / "open_clip_config.json", *_checkpoints(path)]})


class ClipEmbedder:
    """open_clip `encode_image(normalize=True)` on the prepared-resolution images, in eval mode."""

    kind = "clip"

    def __init__(self, *, weights: str | None, model: str, quick_gelu: bool) -> None:
        path = check_weights(weights)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before open_clip imports huggingface_hub
        try:
            import open_clip
            import torch
        except ImportError as err:
            raise InputError(f"the clip embedder needs open_clip and torch ({err})",
                             hint="pip install open-clip-torch==3.3.0, or use --embedder pixel") from None
        self._torch = torch
        try:
            if path.is_dir():
                net, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{path}")
            else:
                net, _, preprocess = open_clip.create_model_and_transforms(
                    model, pretrained=str(path), force_quick_gelu=quick_gelu)
        except (RuntimeError, ValueError, KeyError, OSError, AssertionError, pickle.UnpicklingError) as err:
            # open_clip asserts on shapes; torch.load(weights_only=True) refuses pickles that build other objects
            raise InputError(f"--clip-weights {path}: cannot load into {model}: {str(err).splitlines()[0][:300]}",
                             hint=HOW_TO) from None
        self.model = net.eval()
        self.preprocess = preprocess
        self.path = path
        self.model_name = "local-dir" if path.is_dir() else model
        self.quick_gelu = quick_gelu
        self.weights_sha256 = _weights_digest(path)
        with torch.no_grad():
            self.dim = int(self.model.encode_image(self._batch(np.zeros((1, 3, 8, 8), np.uint8))).shape[1])

    def identity(self) -> dict[str, Any]:
        return {"kind": self.kind, "model": self.model_name, "weights": str(self.path),
                "weights_sha256": self.weights_sha256, "quick_gelu": self.quick_gelu,
                "preprocess": repr(self.preprocess), "version": 1}

    def _batch(self, pixels: np.ndarray) -> Any:
        from PIL import Image

        images = [Image.fromarray(p[0] if p.shape[0] == 1 else p.transpose(1, 2, 0)).convert("RGB") for p in pixels]
        return self._torch.stack([self.preprocess(image) for image in images])

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        with self._torch.no_grad():
            features = self.model.encode_image(self._batch(pixels), normalize=True)
        return normalize_rows(features.float().cpu().numpy())
