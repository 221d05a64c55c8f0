"""`guard prepare`: the prepared directory contract, noise, determinism, the no-original guarantee."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from fixtures.synthetic import write_imagefolder
from helpers import celeba_policy, key_file, lineage, write_policy
from sfbd_guard.curation.noise import keyed_normals, record_key
from sfbd_guard.curation.prepare import prepare
from sfbd_guard.datasets import SourceSpec, open_reader
from sfbd_guard.errors import DataError, InputError
from sfbd_guard.hashing import pixel_sha256, sha256_file
from sfbd_guard.keys.secret import read_key_file
from sfbd_guard.policy.model import load_policy


def _prepare(tmp_path: Path, policy: dict, name: str = "p.yaml", **options: object):  # type: ignore[no-untyped-def]
    return prepare(load_policy(write_policy(tmp_path / name, policy)), **options)  # type: ignore[arg-type]


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_directory_contract(tmp_path: Path, celeba_root: Path, owner_config: Path) -> None:
    out = tmp_path / "prepared"
    result = _prepare(tmp_path, celeba_policy(celeba_root, out, manifest={"metadata": ["Smiling"]}))
    assert sorted(p.name for p in out.iterdir()) == ["card.json", "clean", "manifest.parquet", "protected"]
    manifest = pq.read_table(out / "manifest.parquet")
    assert manifest.column_names[:8] == ["record_id", "partition", "rule", "digest", "sigma", "file", "row", "error"]
    assert not any("seed" in name for name in manifest.column_names), "no noise seed in the manifest"
    assert "Smiling" in manifest.column_names and "identity" not in manifest.column_names, "metadata by allow-list only"
    lineage = pq.read_table(owner_config / "sfbd_guard" / "lineage" / f"{result.card.fingerprint}.parquet")
    assert lineage.column("record_id").to_pylist() == manifest.column("record_id").to_pylist()
    assert "sha256" in lineage.column_names and "identity" in lineage.column_names, "the owner keeps the full lineage"
    assert manifest.num_rows == 32  # the train split only
    card = json.loads((out / "card.json").read_text())
    for key in ("policy_name", "policy_sha256", "format", "root", "split", "resolution", "channels", "sigma",
                "counts", "rule_counts", "files", "tool_version", "created_at", "noise_key_id", "noise_generator"):
        assert key in card
    assert "noise_seed" not in card and "seed" not in card["policy"]["noise"]
    assert card["noise_key_source"] == "key_file"  # the owner's key, created by this first prepare
    assert card["counts"] == result.counts and sum(card["counts"].values()) == 32
    assert card["files"] == {name: sha256_file(out / name) for name in card["files"]}
    assert card["manifest_sha256"] == sha256_file(out / "manifest.parquet")
    rows = manifest.to_pylist()
    for row in rows:
        array = np.load(out / row["file"], mmap_mode="r")
        if row["partition"] == "clean":
            assert array.dtype == np.uint8 and row["sigma"] == 0.0
            assert array[row["row"]].tobytes() == open_reader(SourceSpec("celeba", celeba_root, "train", 16)).load(row["record_id"]).tobytes()
        else:
            assert array.dtype == np.float16 and row["sigma"] == 0.5
        assert array.shape[1:] == (3, 16, 16)


def test_noise_is_gaussian_with_the_policy_sigma(tmp_path: Path) -> None:
    key = key_file(tmp_path / "keys")
    policy = {"version": 1, "name": "digits", "dataset": {"format": "digits", "resolution": 8},
              "rules": [{"name": "all", "action": "protect"}], "noise": {"sigma": 0.8, "key_file": str(key)},
              "output": str(tmp_path / "out")}
    _prepare(tmp_path, policy)
    # the stored rows (dedup merges the few 8 px digits that are near copies of one another: one noisy copy each)
    manifest = [r for r in pq.read_table(tmp_path / "out" / "manifest.parquet").to_pylist() if r["partition"] == "protected"]
    noisy = np.load(tmp_path / "out" / "protected" / "shard-00000.npy").astype(np.float64)
    assert [r["row"] for r in manifest] == list(range(len(noisy)))
    reader = open_reader(SourceSpec("digits", None, "all", 8))
    clean = np.stack([reader.load(r["record_id"]) for r in manifest]).astype(np.float64) / 127.5 - 1
    eps = (noisy - clean) / 0.8
    n = eps.size  # 115k draws of a fresh key each run: tolerances of 5 standard errors (0.015 and 0.010)
    assert abs(eps.mean()) < 5 / np.sqrt(n) and abs(eps.std() - 1) < 5 / np.sqrt(2 * n)
    assert noisy.min() < -1.5 and noisy.max() > 1.5, "noised values are not clipped"
    row = manifest[10]  # the key holder can regenerate a record's noise: ChaCha20 keyed by HMAC(noise subkey, context,
    subkey = read_key_file(key).noise_subkey  # pixel sha256, id)
    pixels = pixel_sha256(reader.load(row["record_id"]))
    expected = keyed_normals(record_key(subkey, row["record_id"], sigma=0.8, shape=(1, 8, 8), pixel_sha256=pixels), 64)
    assert np.allclose(eps[10], expected.reshape(1, 8, 8), atol=2e-3 / 0.8 * 4)
    other = keyed_normals(record_key(subkey, row["record_id"], sigma=0.7, shape=(1, 8, 8), pixel_sha256=pixels), 64)
    assert not np.allclose(eps[10], other.reshape(1, 8, 8), atol=0.5), "another sigma draws independent noise"


def test_two_runs_and_worker_counts_give_identical_bytes(tmp_path: Path, celeba_root: Path) -> None:
    key = key_file(tmp_path / "keys")
    one = _prepare(tmp_path, celeba_policy(celeba_root, tmp_path / "one"), workers=1, key_file=key)
    two = _prepare(tmp_path, celeba_policy(celeba_root, tmp_path / "two"), "q.yaml", workers=2, key_file=key)
    again = _prepare(tmp_path, celeba_policy(celeba_root, tmp_path / "again"), workers=1, key_file=key)
    files = {name: data for name, data in _files(one.output).items() if name != "card.json"}
    assert files == {n: d for n, d in _files(two.output).items() if n != "card.json"}
    assert files == {n: d for n, d in _files(again.output).items() if n != "card.json"}
    assert one.card.fingerprint == two.card.fingerprint == again.card.fingerprint
    assert one.card.noise_key_id == two.card.noise_key_id and one.card.noise_key_source == "key_file"


def test_a_throwaway_key_draws_new_noise_each_run_and_workers_agree(tmp_path: Path, celeba_root: Path) -> None:
    one = _prepare(tmp_path, celeba_policy(celeba_root, tmp_path / "one"), workers=2, ephemeral_key=True)
    two = _prepare(tmp_path, celeba_policy(celeba_root, tmp_path / "two"), workers=1, ephemeral_key=True,
                   allow_rerelease=True)
    assert one.card.noise_key_source == "ephemeral" and one.card.noise_key_id != two.card.noise_key_id
    first, second = _files(one.output), _files(two.output)
    assert [n for n in first if n.startswith("clean/")] and all(first[n] == second[n] for n in first if n.startswith("clean/"))
    protected = [n for n in first if n.startswith("protected/")]
    assert protected and all(first[n] != second[n] for n in protected)
    # within one run the rows do not depend on the worker count: a record's row is the same in a 2-worker run
    # whose chunks split the records differently (same key, see the keyed test above)


def test_a_record_has_the_same_noisy_row_whatever_the_split(tmp_path: Path, celeba_root: Path) -> None:
    protect_all = [{"name": "all", "action": "protect"}]
    key = key_file(tmp_path / "keys")
    train = _prepare(tmp_path, celeba_policy(celeba_root, tmp_path / "train", rules=protect_all), key_file=key)
    every = _prepare(tmp_path, celeba_policy(celeba_root, tmp_path / "every", rules=protect_all,
                                             dataset={"format": "celeba", "root": str(celeba_root), "split": "all", "resolution": 16}),
                     key_file=key)

    def rows(output: Path) -> dict[str, bytes]:
        array = np.load(output / "protected" / "shard-00000.npy")
        return {r["record_id"]: array[r["row"]].tobytes() for r in pq.read_table(output / "manifest.parquet").to_pylist()}

    train_rows, all_rows = rows(train.output), rows(every.output)
    assert len(all_rows) == 40 and all(all_rows[r] == data for r, data in train_rows.items())


def test_no_protected_or_excluded_original_is_written(tmp_path: Path, celeba_root: Path) -> None:
    (tmp_path / "optout.csv").write_text("identity\n2\n")
    policy = celeba_policy(celeba_root, tmp_path / "out")
    policy["rules"].insert(0, {"name": "opt-out", "action": "exclude",
                               "where": "identity IN (SELECT identity FROM read_csv('optout.csv'))"})
    result = _prepare(tmp_path, policy)
    assert result.counts["excluded"] == 4 and result.counts["clean"] > 0 and result.counts["protected"] > 0
    manifest = lineage(result.output).to_pylist()  # the owner's full manifest: every record's id and sha256
    reader = open_reader(SourceSpec("celeba", celeba_root, "train", 16))
    stored = b"".join(_files(result.output).values())
    suffixes = {p.suffix for p in result.output.rglob("*") if p.is_file()}
    assert suffixes <= {".npy", ".json", ".parquet"}, "no image files in a prepared directory"
    for row in manifest:
        pixels = reader.load(row["record_id"])
        assert row["sha256"] is not None
        if row["partition"] in ("protected", "excluded"):
            assert pixels.tobytes() not in stored, f"{row['record_id']} original found under the output"
            assert (pixels.astype(np.float16) / 127.5 - 1).astype(np.float16).tobytes() not in stored
        if row["partition"] == "excluded":
            assert row["file"] is None and row["sigma"] is None


def test_unreadable_images_become_error_rows_or_stop_under_strict(tmp_path: Path) -> None:
    root = write_imagefolder(tmp_path / "images", [{"file_name": f"{i}.png", "license": "CC0-1.0"} for i in range(4)])
    (root / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    policy = {"version": 1, "name": "folder", "dataset": {"format": "imagefolder", "root": str(root), "resolution": 16},
              "rules": [{"name": "all", "action": "clean"}], "noise": {"sigma": 1.0}, "output": str(tmp_path / "out")}
    result = _prepare(tmp_path, policy)
    assert result.counts == {"clean": 3, "protected": 0, "excluded": 0, "error": 1}
    row = next(r for r in lineage(result.output).to_pylist() if r["record_id"] == "2.png")  # the owner's lineage
    assert row["partition"] == "error" and "cannot decode" in row["error"] and row["rule"] is None
    policy["output"] = str(tmp_path / "strict")
    with pytest.raises(DataError, match=r"2\.png"):
        _prepare(tmp_path, policy, strict=True)
    assert not (tmp_path / "strict").exists()
    assert not list(tmp_path.glob(".strict.*")), "no temporary directory left behind"


def test_existing_output_is_refused_and_overwrite_replaces_it(tmp_path: Path, celeba_root: Path) -> None:
    policy = celeba_policy(celeba_root, tmp_path / "out")
    first = _prepare(tmp_path, policy)
    with pytest.raises(InputError, match="already exists"):
        _prepare(tmp_path, policy)
    policy["noise"] = {"sigma": 0.7}
    second = _prepare(tmp_path, policy, overwrite=True, allow_rerelease=True)  # sigma 0.7: another draw
    assert second.card.sigma == 0.7 and second.card.fingerprint != first.card.fingerprint
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out")) == []


def test_interrupted_run_leaves_no_output_and_is_cleaned_next_time(tmp_path: Path, celeba_root: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from sfbd_guard.curation import prepare as module

    def crash(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    policy = celeba_policy(celeba_root, tmp_path / "out")
    monkeypatch.setattr(module, "manifest_table", crash)
    with pytest.raises(KeyboardInterrupt):
        _prepare(tmp_path, policy)
    assert not (tmp_path / "out").exists()
    monkeypatch.undo()
    stale = tmp_path / ".out.partial-999999999-deadbeef"  # a dead process's leftover
    stale.mkdir()
    (stale / "clean").mkdir()
    (stale / "clean" / ".part-000000-000.npy").write_bytes(b"")  # a worker's shard being written
    from sfbd_guard.curation.records import PART_FILE, RECORDS_FILE

    for name in (RECORDS_FILE, PART_FILE.format(3)):  # the records file and a part's metadata
        (stale / name).write_bytes(b"")
    _prepare(tmp_path, policy)
    assert not stale.exists() and (tmp_path / "out" / "card.json").exists()


def test_a_dead_overwrite_is_rolled_back(tmp_path: Path, celeba_root: Path) -> None:
    policy = celeba_policy(celeba_root, tmp_path / "out")
    first = _prepare(tmp_path, policy)
    moved = tmp_path / ".out.old-999999999-deadbeef"
    first.output.rename(moved)  # as if killed between the two renames of --overwrite
    with pytest.raises(InputError, match="already exists"):
        _prepare(tmp_path, policy)
    assert (tmp_path / "out" / "card.json").exists() and not moved.exists()


def test_npy_files_are_standard_and_hashed(tmp_path: Path) -> None:
    from sfbd_guard.fileio import save_npy

    array = np.random.default_rng(0).standard_normal((5, 3, 4, 4)).astype(np.float16)
    digest = save_npy(tmp_path / "a.npy", array)
    np.save(tmp_path / "b.npy", array)
    assert (tmp_path / "a.npy").read_bytes() == (tmp_path / "b.npy").read_bytes()
    assert digest == sha256_file(tmp_path / "a.npy")


def test_noised_copies_draw_each_row_from_its_own_key() -> None:
    from sfbd_guard.curation.noise import noised_copies

    pixels = np.random.default_rng(1).integers(0, 256, (400, 3, 8, 8), dtype=np.uint8)
    secret = bytes(range(32))
    keys = [record_key(secret, f"{i:06d}.jpg", sigma=0.5, shape=(3, 8, 8), pixel_sha256=pixel_sha256(pixels[i])) for i in range(400)]
    noisy = noised_copies(pixels, sigma=0.5, keys=keys)
    assert noisy.dtype == np.float16 and noisy.shape == pixels.shape
    for i in (0, 123, 399):  # each row is its record's own ChaCha20 draw, whatever the other rows
        eps = keyed_normals(keys[i], 192).astype(np.float32).reshape(3, 8, 8)
        expected = (pixels[i].astype(np.float32) / np.float32(127.5) - np.float32(1.0) + np.float32(0.5) * eps).astype(np.float16)
        assert noisy[i].tobytes() == expected.tobytes()
        assert noised_copies(pixels[i : i + 1], sigma=0.5, keys=[keys[i]]).tobytes() == noisy[i].tobytes()
    order = np.random.default_rng(2).permutation(400)
    assert noised_copies(pixels[order], sigma=0.5, keys=[keys[i] for i in order]).tobytes() == noisy[order].tobytes()
    eps = (noisy.astype(np.float64) - (pixels.astype(np.float64) / 127.5 - 1)) / 0.5
    assert abs(eps.mean()) < 0.01 and abs(eps.std() - 1) < 0.01  # 76,800 draws: standard errors 0.004 and 0.003
    other = noised_copies(pixels, sigma=0.5, keys=[record_key(bytes(32), f"{i:06d}.jpg", sigma=0.5, shape=(3, 8, 8),
                                                             pixel_sha256=pixel_sha256(pixels[i])) for i in range(400)])
    assert not np.array_equal(other, noisy), "another secret draws other noise"


def test_keyed_normals_are_standard_normal() -> None:
    z = keyed_normals(record_key(b"k" * 32, "a", sigma=1.0, shape=(1,), pixel_sha256="00" * 32), 200_001)
    assert z.shape == (200_001,) and z.dtype == np.float64
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01
    assert abs(np.mean(z ** 3)) < 0.03 and abs(np.mean(z ** 4) - 3) < 0.06  # skewness 0, kurtosis 3
    assert abs(np.mean(np.abs(z) > 1.96) - 0.05) < 0.003
    assert abs(np.corrcoef(z[:-1], z[1:])[0, 1]) < 0.01  # consecutive draws (a Box–Muller pair) uncorrelated


def test_shards_and_chunks_of_any_size_give_the_same_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sfbd_guard.curation.prepare as prepare_module
    import sfbd_guard.curation.shards as shards_module

    root = write_imagefolder(tmp_path / "images", [{"file_name": f"{i:02d}.png", "kind": "open" if i % 3 else "closed"} for i in range(23)])
    (root / "05.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    policy = {"version": 1, "name": "folder", "dataset": {"format": "imagefolder", "root": str(root), "resolution": 8},
              "rules": [{"name": "open", "action": "clean", "where": "kind = 'open'"}, {"name": "rest", "action": "protect"}],
              "noise": {"sigma": 0.5, "key_file": str(key_file(tmp_path / "keys"))}, "output": str(tmp_path / "big")}
    big = _prepare(tmp_path, policy)
    monkeypatch.setattr(shards_module, "SHARD_RECORDS", 4)  # blocks from a chunk straddle shard boundaries
    monkeypatch.setattr(prepare_module, "CHUNK_RECORDS", 3)
    small = {workers: _prepare(tmp_path, {**policy, "output": str(tmp_path / f"small{workers}")}, workers=workers) for workers in (1, 2)}
    assert big.counts == small[1].counts == {"clean": 14, "protected": 8, "excluded": 0, "error": 1}
    assert _files(small[1].output).keys() == _files(small[2].output).keys()
    assert all(data == _files(small[2].output)[name] for name, data in _files(small[1].output).items() if name != "card.json")

    def rows(output: Path) -> dict[str, bytes]:
        manifest = pq.read_table(output / "manifest.parquet").to_pylist()
        return {r["record_id"]: np.load(output / r["file"])[r["row"]].tobytes() for r in manifest if r["file"]}

    assert rows(big.output) == rows(small[1].output) and len(rows(big.output)) == 22
    assert len(list((small[1].output / "clean").glob("*.npy"))) == 4  # 14 clean rows in shards of 4
