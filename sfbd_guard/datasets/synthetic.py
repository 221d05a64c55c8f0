"""Small datasets written in the real on-disk layouts, for tests, benchmarks and demos.

Nothing here is downloaded: images are smooth random colour fields with a few shapes, distinct per
record, so that curation, training and audit code paths run on the same files a user would have.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CELEBA_ATTRIBUTES = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose Black_Hair "
    "Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair Heavy_Makeup "
    "High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard Oval_Face Pale_Skin Pointy_Nose "
    "Receding_Hairline Rosy_Cheeks Sideburns Smiling Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat "
    "Wearing_Lipstick Wearing_Necklace Wearing_Necktie Young"
).split()


def random_image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A smooth random colour field with an ellipse and a bar: distinct, compressible, face-sized."""
    field = rng.integers(0, 256, size=(5, 4, 3), dtype=np.uint8)
    image = Image.fromarray(field).resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    x, y = int(rng.integers(0, width // 2)), int(rng.integers(0, height // 2))
    colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    draw.ellipse((x, y, x + width // 3, y + height // 3), fill=colour)
    bar = int(rng.integers(0, height - 8))
    draw.rectangle((0, bar, width, bar + 6), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return image


def write_celeba(root: Path, count: int, *, identities: int | None = None, seed: int = 0,
                 splits: tuple[float, float] = (0.8, 0.9)) -> Path:
    """CelebA layout: img_align_celeba/NNNNNN.jpg (178×218) and the three list files."""
    rng = np.random.default_rng(seed)
    images = root / "img_align_celeba"
    images.mkdir(parents=True, exist_ok=True)
    identities = identities or max(1, count // 4)
    names = [f"{i + 1:06d}.jpg" for i in range(count)]
    for name in names:
        random_image(rng, 178, 218).save(images / name, quality=90)
    cut_valid, cut_test = int(count * splits[0]), int(count * splits[1])
    partition = [0 if i < cut_valid else 1 if i < cut_test else 2 for i in range(count)]
    (root / "list_eval_partition.txt").write_text("".join(f"{n} {p}\n" for n, p in zip(names, partition, strict=True)))
    (root / "identity_CelebA.txt").write_text("".join(f"{n} {1 + i % identities}\n" for i, n in enumerate(names)))
    values = rng.choice(np.array(["-1", " 1"]), size=(count, len(CELEBA_ATTRIBUTES)))
    rows = [f"{n} " + " ".join(v) for n, v in zip(names, values, strict=True)]
    header = f"{count}\n" + " ".join(CELEBA_ATTRIBUTES) + "\n"
    (root / "list_attr_celeba.txt").write_text(header + "\n".join(rows) + "\n")
    return root


def write_cifar10(root: Path, per_batch: int, *, seed: int = 0) -> Path:
    """cifar-10-batches-py/ with 5 training batches and a test batch of `per_batch` images each."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    label_names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = np.stack([np.asarray(random_image(rng, 32, 32)).transpose(2, 0, 1).reshape(-1) for _ in range(per_batch)])
        batch = {b"batch_label": name.encode(), b"labels": [int(v) for v in rng.integers(0, 10, per_batch)],
                 b"data": data, b"filenames": [f"{name}_{i}.png".encode() for i in range(per_batch)]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {b"label_names": label_names, b"num_cases_per_batch": per_batch, b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return root


def write_imagefolder(root: Path, rows: list[dict[str, object]], *, extra_images: Sequence[str] = (), seed: int = 0) -> Path:
    """Images named by each row's file_name (PNG or JPEG by suffix) plus metadata.csv with the rows."""
    rng = np.random.default_rng(seed)
    listed = [str(row["file_name"]) for row in rows]
    for name in list(listed) + list(extra_images):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        width, height = int(rng.integers(40, 120)), int(rng.integers(40, 120))
        random_image(rng, width, height).save(path)
    if rows:
        columns = list(rows[0])
        lines = [",".join(columns)] + [",".join("" if row.get(c) is None else str(row[c]) for c in columns) for row in rows]
        (root / "metadata.csv").write_text("\n".join(lines) + "\n")
    return root


IMAGE_SET_FORMATS = ("imagefolder", "webdataset", "parquet")
LICENSES = ("CC0-1.0", "CC-BY-4.0", "proprietary")


def write_image_set(folder: Path, count: int, size: int = 24, formats: Sequence[str] = IMAGE_SET_FORMATS, *,
                    per_shard: int = 4, seed: int = 0) -> dict[str, Path]:
    """The same `count` PNG images (size × size) with the same metadata in each of `formats`, streamed to disk:

    - `imagefolder`: `folder/imagefolder/KEY.png` and `metadata.jsonl` (file_name, key, caption, license, opt_out);
    - `webdataset`: `folder/webdataset/NNNNN.tar` of `per_shard` records each, as img2dataset writes them:
      KEY.png, KEY.json (key, url, caption, license, opt_out, status, sha256 of the file, width, height), KEY.txt;
    - `parquet`: `folder/parquet/data/train-NNNNN.parquet` of 2 × `per_shard` rows each, row groups of
      `per_shard` rows, columns image (the Hugging Face {bytes, path} struct), key, caption, license, opt_out.
    KEY is the record number, 6 digits. Returns {format: dataset root}.
    """
    import io
    import json
    import tarfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    from ..hashing import sha256_bytes

    roots = {name: folder / name for name in formats}
    for root in roots.values():
        root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    jsonl = open(roots["imagefolder"] / "metadata.jsonl", "w") if "imagefolder" in roots else None  # noqa: SIM115
    tar: tarfile.TarFile | None = None
    writer: pq.ParquetWriter | None = None
    batch: list[dict[str, object]] = []
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema([("image", image_type), ("key", pa.string()), ("caption", pa.string()),
                        ("license", pa.string()), ("opt_out", pa.bool_())])

    def add(name: str, data: bytes) -> None:
        assert tar is not None
        info = tarfile.TarInfo(name)
        info.size, info.mtime = len(data), 0
        tar.addfile(info, io.BytesIO(data))

    try:
        for i in range(count):
            key = f"{i:06d}"
            buffer = io.BytesIO()
            random_image(rng, size, size).save(buffer, format="PNG")
            png = buffer.getvalue()
            meta = {"key": key, "caption": f"image number {i}", "license": LICENSES[i % len(LICENSES)],
                    "opt_out": i % 5 == 0}
            if jsonl is not None:
                (roots["imagefolder"] / f"{key}.png").write_bytes(png)
                jsonl.write(json.dumps({"file_name": f"{key}.png", **meta}) + "\n")
            if "webdataset" in roots:
                if i % per_shard == 0:
                    if tar is not None:
                        tar.close()
                    shard = roots["webdataset"] / f"{i // per_shard:05d}.tar"
                    tar = tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115 (closed below)
                record = {**meta, "url": f"https://example.org/{key}.png", "status": "success",
                          "sha256": sha256_bytes(png), "width": size, "height": size}
                add(f"{key}.png", png)
                add(f"{key}.json", json.dumps(record).encode())
                add(f"{key}.txt", str(meta["caption"]).encode())
            if "parquet" in roots:
                batch.append({"image": {"bytes": png, "path": f"{key}.png"}, **meta})
                if len(batch) == per_shard or i == count - 1:
                    start = i + 1 - len(batch)
                    if writer is None or start % (2 * per_shard) == 0:
                        if writer is not None:
                            writer.close()
                        (roots["parquet"] / "data").mkdir(exist_ok=True)
                        name = roots["parquet"] / "data" / f"train-{start // (2 * per_shard):05d}.parquet"
                        writer = pq.ParquetWriter(name, schema)
                    writer.write_table(pa.Table.from_pylist(batch, schema=schema), row_group_size=per_shard)
                    batch = []
    finally:
        if jsonl is not None:
            jsonl.close()
        if tar is not None:
            tar.close()
        if writer is not None:
            writer.close()
    return roots
