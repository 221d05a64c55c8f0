"""`guard prepare --executor ray`: Ray tasks give the local pool's output byte for byte (digits, WebDataset), a
worker process that dies mid-part is retried without duplicating rows, and without Ray the command exits 2
with the install line. Ray runs here on this machine with 2 CPUs (one Ray for the module)."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import digits_policy, key_file, write_image_set, write_policy
from sfbd_guard.curation import ray_parts
from sfbd_guard.curation.prepare import prepare
from sfbd_guard.datasets import base as base_module
from sfbd_guard.executor import ExecutorSpec
from sfbd_guard.policy.model import load_policy

ray = pytest.importorskip("ray")
RAY = ExecutorSpec("ray")


@pytest.fixture(scope="module", autouse=True)
def local_ray() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_same_output(local: Path, remote: Path) -> None:
    """Every array and the manifest byte-identical; the card too, apart from created_at."""
    a, b = _files(local), _files(remote)
    assert sorted(a) == sorted(b)
    assert {k: v for k, v in a.items() if k != "card.json"} == {k: v for k, v in b.items() if k != "card.json"}
    cards = [json.loads(x["card.json"]) for x in (a, b)]
    for card in cards:
        card.pop("created_at")
        card.pop("ledger_head", None)  # the ledger's head when each began
    assert cards[0] == cards[1]


def _policy(tmp_path: Path, policy: dict[str, Any]) -> Any:
    """One policy file (the card names it) with a key file, so that two runs can be compared byte for byte."""
    policy = {**policy, "output": str(tmp_path / "unused")}
    policy["noise"] = {**policy["noise"], "key_file": str(key_file(tmp_path / "keys"))}
    return load_policy(write_policy(tmp_path / "policy.yaml", policy))


def test_digits_on_ray_are_byte_identical_to_local(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(base_module, "PART_RECORDS", 400)  # 5 parts
    policy = digits_policy(tmp_path / "unused", drop=0.2)
    local = prepare(_policy(tmp_path, policy), out=tmp_path / "local", workers=1)
    remote = prepare(_policy(tmp_path, policy), out=tmp_path / "ray", executor=RAY)
    assert remote.counts == local.counts and sum(local.counts.values()) == 1797
    assert_same_output(local.output, remote.output)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no staging folder is left"


def test_webdataset_on_ray_is_byte_identical_to_local(tmp_path: Path) -> None:
    root = write_image_set(tmp_path / "src", 22, size=12, formats=("webdataset",), per_shard=4)["webdataset"]
    (root / "00002.tar").write_bytes(b"not a tar" * 10)  # a broken shard: one error record, on both executors
    policy = {"version": 1, "name": "wds", "dataset": {"format": "webdataset", "root": str(root), "resolution": 8},
              "rules": [{"name": "open", "action": "clean", "where": "license = 'cc-by'"},
                        {"name": "optout", "action": "exclude", "where": "opt_out"},
                        {"name": "rest", "action": "protect"}],
              "noise": {"sigma": 0.5}}
    local = prepare(_policy(tmp_path, policy), out=tmp_path / "local", workers=2)
    remote = prepare(_policy(tmp_path, policy), out=tmp_path / "ray", executor=RAY)
    assert local.counts["error"] == 1 and local.counts["protected"] > 0
    assert_same_output(local.output, remote.output)


def test_a_worker_that_dies_mid_part_is_retried_without_duplicate_rows(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(base_module, "PART_RECORDS", 400)
    marker = tmp_path / "died-once"
    real = ray_parts.decode_part

    def dies_once(spec: Any, task: Any, noise: Any) -> Any:
        if task.part.index == 2 and not marker.exists():
            marker.touch()
            (task.staging / "protected").mkdir(exist_ok=True)  # half a shard of this part, then the process dies
            (task.staging / "protected" / f".part-{task.part.index:06d}-000.npy").write_bytes(b"\x93NUMPY half")
            os._exit(1)
        return real(spec, task, noise)

    monkeypatch.setattr(ray_parts, "decode_part", dies_once)
    policy = digits_policy(tmp_path / "unused", drop=0.2)
    remote = prepare(_policy(tmp_path, policy), out=tmp_path / "ray", executor=RAY)
    assert marker.exists(), "the worker did die"
    monkeypatch.setattr(ray_parts, "decode_part", real)
    local = prepare(_policy(tmp_path, policy), out=tmp_path / "local")
    assert_same_output(local.output, remote.output)


def test_an_error_in_a_task_is_one_line_as_locally(tmp_path: Path, cli: Any) -> None:
    root = write_image_set(tmp_path / "src", 8, size=12, formats=("webdataset",), per_shard=4)["webdataset"]
    policy = {"version": 1, "name": "wds", "dataset": {"format": "webdataset", "root": str(root), "resolution": 8},
              "rules": [{"name": "rest", "action": "protect"}], "noise": {"sigma": 0.5}, "output": str(tmp_path / "out")}
    (root / "00000.tar").write_bytes(b"not a tar" * 10)
    write_policy(tmp_path / "p.yaml", policy)
    result = cli("prepare", "--policy", tmp_path / "p.yaml", "--executor", "ray", "--strict")
    assert result.code == 1 and result.err.startswith("error: record ") and "Traceback" not in result.err
    assert not (tmp_path / "out").exists()


def test_without_ray_the_command_says_how_to_install_it(tmp_path: Path, cli: Any,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    write_policy(tmp_path / "p.yaml", digits_policy(tmp_path / "out"))
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    result = cli("prepare", "--policy", tmp_path / "p.yaml", "--executor", "ray")
    assert result.code == 2
    assert result.err.strip().count("\n") == 0 and "pip install 'sfbd_guard[ray]'" in result.err
    assert not (tmp_path / "out").exists()
    result = cli("audit", "--samples", tmp_path, "--data", tmp_path, "--executor", "ray")
    assert result.code == 2 and result.err.strip().count("\n") == 0 and "pip install 'sfbd_guard[ray]'" in result.err
    result = cli("prepare", "--policy", tmp_path / "p.yaml", "--executor", "dask")
    assert result.code == 2 and "'dask' is not one of 'local', 'ray'" in result.err
