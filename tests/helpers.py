"""Helpers shared by the tests (import as `from helpers import ...`)."""

from __future__ import annotations

from pathlib import Path

import yaml


def celeba_policy(root: Path, out: Path, **overrides: object) -> dict:
    policy: dict = {
        "version": 1,
        "name": "celeba-test",
        "dataset": {"format": "celeba", "root": str(root), "split": "train", "resolution": 16},
        "rules": [
            {"name": "licensed", "action": "clean", "sample": {"fraction": 0.3, "seed": 0, "by": "identity"}},
            {"name": "everything-else", "action": "protect"},
        ],
        "noise": {"sigma": 0.5},
        "output": str(out),
    }
    policy.update(overrides)
    return policy


def guard(*args: object) -> int:
    """Run `guard ARGS...` in-process through the real entry point; its exit code."""
    from sfbd_guard.cli import main

    try:
        main([str(a) for a in args])
    except SystemExit as exit_:
        return int(exit_.code or 0)
    return 0


def key_file(folder: Path, name: str = "noise.key", secret: bytes | None = None) -> Path:
    """A noise key made by the real `guard keygen` code (mode 0600), for byte-identical re-runs; with
    `secret`, that fixed secret in the same format (tests whose margins depend on the noise drawn)."""
    import os

    from sfbd_guard.keys.secret import HEADER, create_key_file

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    if path.exists():
        return path
    if secret is None:
        create_key_file(path)
    else:
        path.write_text(f"{HEADER} {secret.hex()}\n")
        os.chmod(path, 0o600)
    return path


def lineage(prepared: Path):  # type: ignore[no-untyped-def]
    """The owner's full manifest of a prepared directory (file names, metadata, plain sha256: keys/owner.py), found by
    its card's fingerprint in the test's owner folder (XDG_CONFIG_HOME, conftest.py), as an Arrow table."""
    import json

    import pyarrow.parquet as pq

    from sfbd_guard.keys.owner import lineage_path

    return pq.read_table(lineage_path(json.loads((prepared / "card.json").read_text())["fingerprint"]))


def write_policy(path: Path, policy: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(policy, sort_keys=False))
    return path


def tiny_pipeline(data: Path, out: Path, **overrides: object) -> dict:
    """A pipeline small enough for tests: 8 px digits, a 16-channel U-Net, a few dozen steps."""
    pipeline: dict = {
        "version": 1, "name": "tiny", "data": str(data), "method": "clean-only",
        "model": {"model_channels": 16, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [4]},
        "optimizer": {"lr": 2e-3, "warmup_kimg": 0.1}, "batch": 16,
        "schedule": {"pretrain_kimg": 0.128},  # 8 steps
        "ema": {"halflife_kimg": 0.05}, "seed": 0, "device": "cpu",
        "checkpoint_every": 4, "snapshot_every": 1000, "grid_size": 4, "out": str(out),
    }
    pipeline.update(overrides)
    return pipeline


def digits_policy(out: Path, resolution: int = 8, *, drop: float | None = None) -> dict:
    """10% of the digits clean, the rest protected at sigma 0.6; `drop` excludes that fraction first (smaller, faster)."""
    rules = [{"name": "licensed", "action": "clean", "sample": {"fraction": 0.1}}, {"name": "rest", "action": "protect"}]
    if drop:
        rules.insert(0, {"name": "dropped", "action": "exclude", "sample": {"fraction": drop, "seed": 5}})
    return {"version": 1, "name": "digits", "dataset": {"format": "digits", "resolution": resolution},
            "rules": rules, "noise": {"sigma": 0.6}, "output": str(out)}


def plant_samples(prepared: Path, out: Path, *, copies: int, novel: int, seed: int = 0,
                  transform=None) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """A sample folder for audit tests: `copies` protected originals of `prepared` (read through the real
    reader, optionally passed through `transform(uint8 CHW) -> uint8 CHW`) and `novel` unrelated images.
    Returns {file name: source record_id} for the planted copies."""
    import json

    import numpy as np
    import pyarrow.parquet as pq
    from PIL import Image

    from fixtures.synthetic import random_image
    from sfbd_guard.datasets import SourceSpec, open_reader

    card = json.loads((prepared / "card.json").read_text())
    rows = pq.read_table(prepared / "manifest.parquet", columns=["record_id", "partition"]).to_pylist()
    protected = [r["record_id"] for r in rows if r["partition"] == "protected"]
    reader = open_reader(SourceSpec(card["format"], prepared / card["root"] if card["root"] else None, card["split"],
                                    card["resolution"]))
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    planted = {}
    for i, record in enumerate(rng.choice(protected, size=copies, replace=False)):
        pixels = reader.load(str(record))
        pixels = transform(pixels) if transform else pixels
        array = pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0)
        Image.fromarray(np.ascontiguousarray(array)).save(out / f"copy-{i:03d}.png")
        planted[f"copy-{i:03d}.png"] = str(record)
    other = np.random.default_rng([seed, 12345])  # not write_celeba's stream: novel images are not crops of records
    for i in range(novel):
        random_image(other, 178, 218).save(out / f"novel-{i:03d}.jpg", quality=90)
    return planted


def read_events(ledger: Path):  # type: ignore[no-untyped-def]
    """All events of a ledger as one Arrow table, oldest first (empty ledger → None), as a test sees the files."""
    import duckdb

    if not any(ledger.glob("**/*.parquet")):
        return None
    pattern = str(ledger / "**" / "*.parquet")
    return duckdb.connect().sql(
        "SELECT * FROM read_parquet(?, union_by_name=true) ORDER BY started_at", params=[pattern]
    ).to_arrow_table()


def write_image_set(folder: Path, count: int, size: int = 24,
                    formats: tuple[str, ...] = ("imagefolder", "webdataset", "parquet"), *,
                    per_shard: int = 4, seed: int = 0) -> dict[str, Path]:
    """The same `count` PNG images and metadata (columns key, caption, license, opt_out) as an image folder with
    metadata.jsonl, as WebDataset shards and as Parquet files (HF struct): {format: dataset root}. See
    fixtures.synthetic.write_image_set."""
    from fixtures.synthetic import write_image_set as write

    return write(folder, count, size, formats, per_shard=per_shard, seed=seed)


def write_chain(folder: Path, name: str = "digits-chain") -> Path:
    """The demo chain in `folder` (policy with an opt-out list and a held-out rule, audit config, pipeline; all
    paths relative to `folder`): returns the pipeline file."""
    (folder / "optout.csv").write_text("idx\n3\n14\n15\n")
    policy = {"version": 1, "name": name, "dataset": {"format": "digits", "resolution": 8},
              "rules": [{"name": "opt-out", "action": "exclude", "where": "index IN (SELECT idx FROM read_csv('optout.csv'))"},
                        {"name": "held-out", "action": "holdout", "sample": {"fraction": 0.2, "seed": 1}},
                        {"name": "licensed", "action": "clean", "sample": {"fraction": 0.1}},
                        {"name": "rest", "action": "protect"}],
              "noise": {"sigma": 0.6}, "output": "prepared"}
    write_policy(folder / "policy.yaml", policy)
    (folder / "audit.yaml").write_text(yaml.safe_dump({"version": 1, "name": "t", "calibration": {"holdout_rules": ["held-out"]}}))
    pipeline = tiny_pipeline(Path("prepared"), Path("runs/chain"), policy="policy.yaml",
                             sample={"n": 8, "steps": 4, "batch": 8}, audit={"config": "audit.yaml"})
    return write_policy(folder / "pipeline.yaml", pipeline)


def digits_run_with_holdout(tmp: Path) -> tuple[Path, Path]:
    """The digits (60 % dropped first) with a holdout rule, prepared, and a tiny clean-only run on them (no ledger):
    what the membership tests need."""
    from sfbd_guard.curation.prepare import prepare
    from sfbd_guard.engine.config import PipelineConfig
    from sfbd_guard.engine.service import train
    from sfbd_guard.policy.model import load_policy

    policy = digits_policy(tmp / "prepared", drop=0.6)
    policy["rules"].insert(1, {"name": "held-out", "action": "holdout", "sample": {"fraction": 0.2, "seed": 1}})
    policy["noise"]["key_file"] = str(key_file(tmp / "keys"))
    data = prepare(load_policy(write_policy(tmp / "policy.yaml", policy))).output
    run = tmp / "runs" / "clean"
    train(PipelineConfig.model_validate(tiny_pipeline(data, run)), resume=False)
    return data, run
