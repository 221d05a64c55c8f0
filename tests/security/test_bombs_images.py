"""Attacks with hostile image and batch files: decompression bombs, huge files, FIFOs, bad CIFAR batches,
and image modes that used to be decoded wrongly (16-bit PNGs saturated at 255) or with warnings.

A bomb or an oversized file becomes an `error` row, found from the header or the file size alone:
nothing is decoded or read whole, and PIL's own bomb warning/error never surfaces.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import threading
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from fixtures.synthetic import write_cifar10, write_imagefolder
from helpers import lineage, write_policy
from sfbd_guard.datasets import SourceSpec, open_reader
from sfbd_guard.datasets.transforms import load_square
from sfbd_guard.errors import ImageDecodeError


@pytest.fixture(autouse=True)
def _no_big_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    """Decoding a bomb would allocate gigabytes: fail the test instead if anything tries to."""
    load = ImageFile.ImageFile.load

    def guarded(self):  # type: ignore[no-untyped-def]
        assert self.size[0] * self.size[1] <= 4_000_000, f"decoded a {self.size} image"
        return load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", guarded)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bytes(width: int, height: int, *, depth: int = 8, colour: int = 2, rows: bytes = b"") -> bytes:
    """A PNG with any declared size; `rows` is the raw (filtered) scanline data, empty for a bomb header."""
    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(rows)) + _chunk(b"IEND", b"")


def _folder_policy(root: Path, out: Path, **dataset: object) -> dict:
    return {"version": 1, "name": "folder",
            "dataset": {"format": "imagefolder", "root": str(root), "resolution": 16, **dataset},
            "rules": [{"name": "all", "action": "clean"}], "noise": {"sigma": 1.0}, "output": str(out)}


def _rows(out: Path) -> dict[str, dict]:
    """The owner's lineage (the trainer's manifest names error rows by opaque ids and no reason)."""
    return {row["record_id"]: row for row in lineage(out).to_pylist()}


def test_png_declaring_20000_squared_pixels_is_an_error_row_without_decoding(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root = write_imagefolder(tmp_path / "data", [], extra_images=["a.png"])
    (root / "bomb.png").write_bytes(png_bytes(20_000, 20_000))  # 4e8 pixels declared in a 60-byte file
    (root / "wide.png").write_bytes(png_bytes(2_000_000, 100))  # 2e8: just above the default budget
    started = time.perf_counter()
    result = cli("prepare", "--policy", write_policy(tmp_path / "p.yaml", _folder_policy(root, tmp_path / "out")))
    assert result.code == 0 and result.err == "", result.err
    assert time.perf_counter() - started < 30
    rows = _rows(tmp_path / "out")
    assert rows["a.png"]["partition"] == "clean"
    for name in ("bomb.png", "wide.png"):
        assert rows[name]["partition"] == "error" and "dataset.max_pixels = 178956970" in rows[name]["error"], rows[name]


def test_the_policy_pixel_budget_applies(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path / "data"
    root.mkdir()
    Image.new("RGB", (300, 200), (10, 20, 30)).save(root / "big.png")
    Image.new("RGB", (90, 100), (10, 20, 30)).save(root / "small.png")
    policy = write_policy(tmp_path / "p.yaml", _folder_policy(root, tmp_path / "out", max_pixels=10_000))
    assert cli("prepare", "--policy", policy).code == 0
    rows = _rows(tmp_path / "out")
    assert rows["small.png"]["partition"] == "clean"
    assert rows["big.png"]["partition"] == "error" and "300×200 = 60000 pixels" in rows["big.png"]["error"]
    too_big = write_policy(tmp_path / "q.yaml", _folder_policy(root, tmp_path / "out2", max_pixels=5_000_000_000))
    result = cli("prepare", "--policy", too_big)
    assert result.code == 2 and "dataset.max_pixels" in result.err and "Traceback" not in result.err


@pytest.mark.parametrize("side", [33_000, 47_000])  # above PIL's own limit: its warning, and its error
def test_pil_bomb_warning_and_error_never_surface(tmp_path: Path, side: int) -> None:
    (tmp_path / "x.png").write_bytes(png_bytes(side, side))
    reader = open_reader(SourceSpec("imagefolder", tmp_path, "all", 16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a DecompressionBombWarning would be raised here
        with pytest.raises(ImageDecodeError, match="max_pixels"):
            reader.load("x.png")


def test_a_file_above_the_byte_budget_is_an_error_row_without_being_read(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root = write_imagefolder(tmp_path / "data", [], extra_images=["a.png"])
    with open(root / "huge.png", "wb") as handle:  # sparse: 300 MiB declared, nothing on disk
        handle.truncate(300 * 2**20)
    result = cli("prepare", "--policy", write_policy(tmp_path / "p.yaml", _folder_policy(root, tmp_path / "out")))
    assert result.code == 0, result.err
    row = _rows(tmp_path / "out")["huge.png"]
    assert row["partition"] == "error" and "314572800 bytes" in row["error"] and "dataset.max_file_bytes" in row["error"]
    policy = write_policy(tmp_path / "q.yaml", _folder_policy(root, tmp_path / "low", max_file_bytes=100))
    assert cli("prepare", "--policy", policy).code == 0
    assert "dataset.max_file_bytes = 100" in _rows(tmp_path / "low")["a.png"]["error"]


def test_a_fifo_named_like_an_image_does_not_hang_the_run(tmp_path: Path) -> None:
    root = write_imagefolder(tmp_path / "data", [{"file_name": "a.png"}])
    with open(root / "metadata.csv", "a") as handle:
        handle.write("pipe.png\n")
    os.mkfifo(root / "pipe.png")
    reader = open_reader(SourceSpec("imagefolder", root, "all", 16))
    outcome: list[object] = []

    def load() -> None:
        try:
            reader.load("pipe.png")
        except ImageDecodeError as err:
            outcome.append(err)

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    worker.join(10)
    assert not worker.is_alive(), "opening the FIFO blocked"
    assert outcome and "not a regular file" in str(outcome[0])


CIFAR_ATTACKS = {
    "wrong shape": (lambda b: b.update({b"data": b[b"data"][:, :3000]}), "uint8 array [N, 3072]"),
    "float dtype": (lambda b: b.update({b"data": b[b"data"].astype(np.float32)}), "float32"),
    "label 42": (lambda b: b[b"labels"].__setitem__(1, 42), "label 42 of image 1"),
    "negative label": (lambda b: b[b"labels"].__setitem__(0, -1), "label -1 of image 0"),
    "float label": (lambda b: b[b"labels"].__setitem__(0, 1.5), "label 1.5"),
    "too few labels": (lambda b: b[b"labels"].pop(), "2 labels for 3 images"),
    "no labels": (lambda b: b.pop(b"labels"), "'labels' must be a list"),
    "no data": (lambda b: b.pop(b"data"), "'data' must be a uint8 array"),
}


@pytest.mark.parametrize("case", sorted(CIFAR_ATTACKS))
def test_a_bad_cifar_batch_exits_2_with_one_line(cli, tmp_path: Path, case: str) -> None:  # type: ignore[no-untyped-def]
    root = write_cifar10(tmp_path / "cifar", 3)
    path = root / "cifar-10-batches-py" / "data_batch_2"
    batch = pickle.loads(path.read_bytes())
    change, fragment = CIFAR_ATTACKS[case]
    change(batch)
    path.write_bytes(pickle.dumps(batch, protocol=2))
    policy = {"version": 1, "name": "cifar", "dataset": {"format": "cifar10", "root": str(root), "split": "train", "resolution": 32},
              "rules": [{"name": "all", "action": "clean"}], "noise": {"sigma": 1.0}, "output": str(tmp_path / "out")}
    result = cli("prepare", "--policy", write_policy(tmp_path / "p.yaml", policy))
    lines = result.err.strip().splitlines()
    assert result.code == 2, (result.code, result.err)
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.err, lines
    assert str(path) in lines[0] and fragment in lines[0], lines[0]
    assert not (tmp_path / "out").exists()


def test_a_cifar_batch_above_the_byte_budget_is_refused_unread(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root = write_cifar10(tmp_path / "cifar", 3)
    policy = {"version": 1, "name": "cifar", "dataset": {"format": "cifar10", "root": str(root), "split": "train",
                                                         "resolution": 32, "max_file_bytes": 1000},
              "rules": [{"name": "all", "action": "clean"}], "noise": {"sigma": 1.0}, "output": str(tmp_path / "out")}
    result = cli("prepare", "--policy", write_policy(tmp_path / "p.yaml", policy))
    assert result.code == 2 and "dataset.max_file_bytes = 1000" in result.err and "Traceback" not in result.err


def test_16_bit_grey_pngs_are_scaled_not_saturated(tmp_path: Path) -> None:
    from sfbd_guard.datasets.transforms import to_rgb

    values = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 65535 // (64 * 64 - 1)).astype(np.uint16)
    expected = np.rint(values / 257.0).astype(np.uint8)  # round(v × 255 / 65535)
    Image.fromarray(values).save(tmp_path / "g16.png")  # mode I;16, written as a 16-bit PNG
    with Image.open(tmp_path / "g16.png") as written:
        assert written.mode.startswith("I")
    pixels = np.asarray(load_square(tmp_path / "g16.png", 64))
    assert pixels.shape == (64, 64, 3) and np.array_equal(pixels[..., 0], expected) and np.array_equal(pixels[..., 2], expected)
    assert 120 <= pixels.mean() <= 135, "a mid-grey gradient, not white"
    for image in (Image.fromarray(values.astype(">u2")), Image.fromarray(values.astype(np.int32))):  # I;16B and I
        assert image.mode in ("I;16B", "I")
        assert np.array_equal(np.asarray(to_rgb(image))[..., 1], expected), image.mode
    # through the reader, at another resolution: still a gradient from black to white
    small = open_reader(SourceSpec("imagefolder", tmp_path, "all", 16)).load("g16.png")
    assert small.min() < 10 and small.max() > 245 and 110 <= small.mean() <= 145


def test_16_bit_rgb_png_keeps_its_levels(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    values = rng.integers(0, 65536, size=(8, 8, 3)).astype(">u2")
    rows = b"".join(b"\x00" + values[y].tobytes() for y in range(8))
    (tmp_path / "rgb16.png").write_bytes(png_bytes(8, 8, depth=16, colour=2, rows=rows))
    pixels = np.asarray(load_square(tmp_path / "rgb16.png", 8)).astype(int)
    assert np.abs(pixels - np.rint(values / 257.0)).max() <= 1  # PIL keeps the high byte: within one level


def test_transparent_cmyk_grey_and_animated_images_decode_without_warnings(tmp_path: Path) -> None:
    palette = Image.new("P", (40, 40), 0)
    palette.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    palette.paste(1, (0, 0, 20, 40))
    palette.save(tmp_path / "palette.png", transparency=bytes([0, 255]))  # colour 0 fully transparent
    grey_alpha = Image.new("LA", (40, 40), (0, 0))
    grey_alpha.paste((90, 255), (0, 0, 20, 40))
    grey_alpha.save(tmp_path / "la.png")
    Image.new("CMYK", (40, 40), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    red, blue = Image.new("RGB", (40, 40), (255, 0, 0)), Image.new("RGB", (40, 40), (0, 0, 255))
    red.save(tmp_path / "anim.gif", save_all=True, append_images=[blue])
    red.save(tmp_path / "anim.webp", save_all=True, append_images=[blue], lossless=True)
    Image.new("1", (40, 40), 1).save(tmp_path / "bilevel.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        decoded = {p.name: np.asarray(load_square(p, 40)) for p in sorted(tmp_path.iterdir())}
    assert all(a.shape == (40, 40, 3) and a.dtype == np.uint8 for a in decoded.values())
    assert tuple(decoded["palette.png"][5, 5]) == (200, 100, 50)  # opaque half
    assert tuple(decoded["palette.png"][5, 35]) == (255, 255, 255)  # transparent half: the white background
    assert tuple(decoded["la.png"][5, 5]) == (90, 90, 90) and tuple(decoded["la.png"][5, 35]) == (255, 255, 255)
    assert np.abs(decoded["cmyk.jpg"][20, 20].astype(int) - (255, 0, 0)).max() <= 8
    assert tuple(decoded["anim.gif"][20, 20]) == (255, 0, 0) and tuple(decoded["anim.webp"][20, 20]) == (255, 0, 0)
    assert decoded["bilevel.png"].min() == 255


def test_only_png_jpeg_webp_and_gif_are_decoded(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (20, 20), (1, 2, 3)).save(buffer, "BMP")
    (tmp_path / "x.png").write_bytes(buffer.getvalue())  # a BMP under an image name
    with pytest.raises(ImageDecodeError, match="not a PNG, JPEG, WebP or GIF"):
        load_square(tmp_path / "x.png", 16)
