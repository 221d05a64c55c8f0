"""Attacks on the data path: a dataset whose files or lists point outside its root.

Each record that leads outside the dataset root (a symlink, `..`, an absolute path) must become an
`error` row with the reason, and nothing of the outside file may reach any output: neither its bytes
nor its decoded pixels, in the prepared directory or the ledger.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from fixtures.synthetic import random_image, write_celeba, write_imagefolder
from helpers import lineage, write_policy
from sfbd_guard.datasets.transforms import load_square

RESOLUTION = 16


def _folder_policy(root: Path, out: Path) -> dict:
    """Every record clean: an outside image that got read would be stored as plain uint8 pixels."""
    return {"version": 1, "name": "folder", "dataset": {"format": "imagefolder", "root": str(root), "resolution": RESOLUTION},
            "rules": [{"name": "all", "action": "clean"}], "noise": {"sigma": 1.0}, "output": str(out)}


def _secret(path: Path, seed: int, size: tuple[int, int] = (64, 64)) -> Path:
    """An image outside the dataset that must never be read."""
    path.parent.mkdir(parents=True, exist_ok=True)
    random_image(np.random.default_rng(1000 + seed), *size).save(path)
    return path


def _rows(out: Path) -> dict[str, dict]:
    return {row["record_id"]: row for row in lineage(out).to_pylist()}  # the owner's full manifest


def _assert_never_read(secret: Path, crop: int | None, *outputs: Path) -> None:
    """Neither the file's bytes nor its decoded pixels at the prepared resolution appear in any output file."""
    raw = secret.read_bytes()
    pixels = np.asarray(load_square(secret, RESOLUTION, crop)).transpose(2, 0, 1).tobytes()
    for folder in outputs:
        for path in folder.rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                assert raw not in data and pixels not in data, f"{secret.name} leaked into {path}"


def test_imagefolder_symlink_out_of_the_root_is_an_error_row_and_never_read(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root = write_imagefolder(tmp_path / "data", [], extra_images=["a.png", "b.png"])
    secret = _secret(tmp_path / "home" / "private.png", 0)
    (root / "innocent.png").symlink_to(secret)
    (root / "alias.png").symlink_to(root / "a.png")  # a symlink that stays inside the root is fine
    (root / "loop.png").symlink_to(root / "loop.png")
    policy = write_policy(tmp_path / "p.yaml", _folder_policy(root, tmp_path / "out"))
    result = cli("prepare", "--policy", policy)
    assert result.code == 0, result.err
    rows = _rows(tmp_path / "out")
    assert rows["innocent.png"]["partition"] == "error"
    assert "escapes the dataset root" in rows["innocent.png"]["error"]
    assert str(secret) not in rows["innocent.png"]["error"], "the reason does not reveal where the link leads"
    assert rows["alias.png"]["partition"] == "clean" and rows["alias.png"]["sha256"] == rows["a.png"]["sha256"]
    assert rows["loop.png"]["partition"] == "error" and "symlink loop" in rows["loop.png"]["error"]
    _assert_never_read(secret, None, tmp_path / "out", tmp_path / "ledger")


def test_imagefolder_symlinked_directory_out_of_the_root_is_not_traversed(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root = write_imagefolder(tmp_path / "data", [], extra_images=["a.png"])
    outside = tmp_path / "home" / "photos"
    secret = _secret(outside / "holiday.png", 1)
    (root / "photos").symlink_to(outside, target_is_directory=True)
    policy = write_policy(tmp_path / "p.yaml", _folder_policy(root, tmp_path / "scan"))
    assert cli("prepare", "--policy", policy).code == 0
    assert list(_rows(tmp_path / "scan")) == ["a.png"], "the scan does not enter a symlinked directory"
    # the metadata naming a file through the symlinked directory: an error row, not a read
    (root / "metadata.csv").write_text("file_name,license\nphotos/holiday.png,CC0-1.0\na.png,CC0-1.0\n")
    policy = write_policy(tmp_path / "p.yaml", _folder_policy(root, tmp_path / "listed"))
    result = cli("prepare", "--policy", policy)
    assert result.code == 0, result.err
    row = _rows(tmp_path / "listed")["photos/holiday.png"]
    assert row["partition"] == "error" and "escapes the dataset root" in row["error"]
    _assert_never_read(secret, None, tmp_path / "scan", tmp_path / "listed", tmp_path / "ledger")


def test_imagefolder_metadata_file_name_with_dotdot_or_absolute_path_is_an_error_row(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root = write_imagefolder(tmp_path / "data", [{"file_name": "a.png", "license": "CC0-1.0"}])
    near = _secret(tmp_path / "x.png", 2)
    far = _secret(tmp_path / "elsewhere" / "y.png", 3)
    with open(root / "metadata.csv", "a") as handle:
        handle.write(f"../x.png,CC0-1.0\n{far},CC0-1.0\nsub\\..\\..\\x.png,CC0-1.0\n")  # the last with backslashes
    policy = write_policy(tmp_path / "p.yaml", _folder_policy(root, tmp_path / "out"))
    result = cli("prepare", "--policy", policy)
    assert result.code == 0, result.err
    rows = _rows(tmp_path / "out")
    assert rows["a.png"]["partition"] == "clean"
    escaping = [r for r in rows if r != "a.png"]
    assert len(escaping) == 3 and str(far) in escaping
    for record in escaping:
        assert rows[record]["partition"] == "error" and "escapes the dataset root" in rows[record]["error"], record
    _assert_never_read(near, None, tmp_path / "out", tmp_path / "ledger")
    _assert_never_read(far, None, tmp_path / "out", tmp_path / "ledger")


def test_celeba_lists_naming_dotdot_or_absolute_paths_are_error_rows(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root = write_celeba(tmp_path / "celeba", 6, identities=2)
    inside_root = _secret(root / "outside.jpg", 4, (178, 218))  # img_align_celeba/../outside.jpg
    beyond = _secret(tmp_path / "outside.jpg", 5, (178, 218))  # img_align_celeba/../../outside.jpg
    absolute = _secret(tmp_path / "abs" / "path.jpg", 6, (178, 218))
    names = ["../outside.jpg", "../../outside.jpg", str(absolute)]
    for list_file, value in (("list_eval_partition.txt", "0"), ("identity_CelebA.txt", "1")):
        with open(root / list_file, "a") as handle:
            handle.write("".join(f"{name} {value}\n" for name in names))
    with open(root / "list_attr_celeba.txt", "a") as handle:
        handle.write("".join(f"{name} " + " ".join(["1"] * 40) + "\n" for name in names))
    policy = {"version": 1, "name": "celeba", "dataset": {"format": "celeba", "root": str(root), "split": "train",
                                                          "resolution": RESOLUTION},
              "rules": [{"name": "all", "action": "clean"}], "noise": {"sigma": 1.0}, "output": str(tmp_path / "out")}
    result = cli("prepare", "--policy", write_policy(tmp_path / "p.yaml", policy))
    assert result.code == 0, result.err
    rows = _rows(tmp_path / "out")
    for name in names:
        assert rows[name]["partition"] == "error" and "escapes the dataset root" in rows[name]["error"], name
    assert sum(r["partition"] == "clean" for r in rows.values()) == 4  # the real training images
    for secret in (inside_root, beyond, absolute):
        _assert_never_read(secret, 140, tmp_path / "out", tmp_path / "ledger")


def test_celeba_list_file_or_image_folder_symlinked_out_of_the_root_exits_2(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    source = write_celeba(tmp_path / "real", 4, identities=2)
    root = tmp_path / "celeba"
    root.mkdir()
    for name in ("list_eval_partition.txt", "identity_CelebA.txt"):
        (root / name).write_bytes((source / name).read_bytes())
    (root / "list_attr_celeba.txt").symlink_to(source / "list_attr_celeba.txt")
    (root / "img_align_celeba").symlink_to(source / "img_align_celeba", target_is_directory=True)
    policy = {"version": 1, "name": "celeba", "dataset": {"format": "celeba", "root": str(root), "split": "all",
                                                          "resolution": RESOLUTION},
              "rules": [{"name": "all", "action": "clean"}], "noise": {"sigma": 1.0}, "output": str(tmp_path / "out")}
    path = write_policy(tmp_path / "p.yaml", policy)
    result = cli("prepare", "--policy", path)
    assert result.code == 2 and result.err.startswith("error: ") and "escapes the dataset root" in result.err
    assert "Traceback" not in result.err and not (tmp_path / "out").exists()
    (root / "img_align_celeba").unlink()
    (root / "img_align_celeba").mkdir()
    result = cli("prepare", "--policy", path)
    assert result.code == 2 and "list_attr_celeba.txt" in result.err and "escapes the dataset root" in result.err


def test_pixels_of_an_image_inside_the_root_are_unchanged(tmp_path: Path) -> None:
    """The path checks do not change what a normal record decodes to."""
    from sfbd_guard.datasets import SourceSpec, open_reader

    root = write_imagefolder(tmp_path / "data", [], extra_images=["sub/a.png"])
    pixels = open_reader(SourceSpec("imagefolder", root, "all", RESOLUTION)).load("sub/a.png")
    with Image.open(root / "sub" / "a.png") as image:
        side = min(image.size)
        left, top = (image.size[0] - side) // 2, (image.size[1] - side) // 2
        expected = image.convert("RGB").resize((RESOLUTION, RESOLUTION), Image.Resampling.LANCZOS,
                                               box=(left, top, left + side, top + side))
    assert np.array_equal(pixels, np.asarray(expected).transpose(2, 0, 1))
