"""`guard audit --executor ray` and the sharded reference index: the same samples.parquet and summary as a local
audit with one shard, with the embeddings computed by Ray actors, with the reference set in several shards (in
memory, and from the index cache's files), and when an embedding actor's process dies mid-task."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from helpers import plant_samples, write_policy
from sfbd_guard.auditing.config import resolve_audit_config
from sfbd_guard.auditing.service import run_audit
from sfbd_guard.curation.prepare import prepare
from sfbd_guard.embedding import ray_embed
from sfbd_guard.executor import LOCAL, ExecutorSpec
from sfbd_guard.policy.model import load_policy

ray = pytest.importorskip("ray")
RAY = ExecutorSpec("ray")
# What may differ between two audits of the same samples: how long they took, and how the index was stored.
VARYING = ("timings", "config")


@pytest.fixture(scope="module", autouse=True)
def local_ray() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the actor class below, for Ray's workers
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Prepared digits (8 px; 20 % held out to calibrate) and a sample folder with planted copies."""
    tmp = tmp_path_factory.mktemp("ray-audit")
    policy = {"version": 1, "name": "digits", "dataset": {"format": "digits", "resolution": 8},
              "rules": [{"name": "held-out", "action": "holdout", "sample": {"fraction": 0.2, "seed": 1}},
                        {"name": "licensed", "action": "clean", "sample": {"fraction": 0.1}},
                        {"name": "rest", "action": "protect"}],
              "noise": {"sigma": 0.6}, "output": str(tmp / "prepared")}
    prepared = prepare(load_policy(write_policy(tmp / "p.yaml", policy))).output
    plant_samples(prepared, tmp / "samples", copies=4, novel=5)
    return prepared, tmp / "samples"


def _audit(chain: tuple[Path, Path], report: Path, executor: ExecutorSpec = LOCAL, **search: Any) -> dict[str, Any]:
    overrides: dict[str, Any] = {"calibration.holdout_rules": ["held-out"]}
    overrides.update({f"search.{key}": value for key, value in search.items() if key != "cache"})
    if search.get("cache"):
        overrides.update({"cache.enabled": True, "cache.dir": str(search["cache"])})
    config = resolve_audit_config(None, overrides)
    result = run_audit(samples=chain[1], data=chain[0], report=report, config=config, executor=executor)
    summary = json.loads((report / "summary.json").read_text())
    return {"summary": summary, "index": summary["index"], "table": pq.read_table(report / "samples.parquet"),
            "same": {k: v for k, v in summary.items() if k not in (*VARYING, "index")}, "counts": result.counts}


def assert_same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["table"].equals(b["table"]), "samples.parquet: the same rows, neighbours, scores and verdicts"
    assert a["same"] == b["same"], "summary.json: the same apart from timings, settings and index layout"
    assert a["index"]["references"] == b["index"]["references"]


def test_ray_and_shards_give_the_local_audit(chain: tuple[Path, Path], tmp_path: Path) -> None:
    local = _audit(chain, tmp_path / "local")
    assert local["counts"]["copy"] >= 4 and local["index"]["kind"] == "flat inner product (exact, faiss.knn)"
    remote = _audit(chain, tmp_path / "ray", RAY)
    assert_same(local, remote)
    sharded = _audit(chain, tmp_path / "ray-shards", RAY, shard_size=97)
    references = local["index"]["references"]
    assert sharded["index"]["kind"].endswith(f"in {-(-references // 97)} shards")
    assert_same(local, sharded)
    cache = tmp_path / "cache"
    on_disk = _audit(chain, tmp_path / "disk-shards", shard_size=300, cache=cache)
    entry = next(cache.iterdir())
    assert len(list(entry.glob("emb-*.npy"))) == -(-references // 300) and on_disk["index"]["cache"] == "built"
    assert_same(local, on_disk)
    again = _audit(chain, tmp_path / "cached", shard_size=300, cache=cache)
    assert again["index"]["cache"] == "cached"
    assert_same(local, again)


class _DiesOnce(ray_embed.EmbedWorker):
    """An embedding actor whose process exits in the middle of its first unit of work (once, over restarts)."""

    marker = ""

    def embed(self, pixels: Any, batch: int) -> Any:
        if not os.path.exists(self.marker):
            Path(self.marker).touch()
            os._exit(1)
        return super().embed(pixels, batch)


def test_an_embedding_actor_that_dies_is_restarted_with_the_same_result(chain: tuple[Path, Path], tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    class Dies(_DiesOnce):
        marker = str(tmp_path / "died")

    monkeypatch.setattr(ray_embed, "EmbedWorker", Dies)
    remote = _audit(chain, tmp_path / "ray", RAY)
    assert (tmp_path / "died").exists(), "an actor did die"
    monkeypatch.undo()
    assert_same(_audit(chain, tmp_path / "local"), remote)


def test_membership_errors_are_the_same_with_one_and_two_ray_workers(chain: tuple[Path, Path], tmp_path: Path) -> None:
    """guard membership --executor ray: the denoising errors, hence every number, identical with 1 and 2 actors, and
    the local run's within float tolerance (it may use other thread counts)."""
    import numpy as np

    from helpers import tiny_pipeline
    from sfbd_guard.auditing.model_audit import run_membership
    from sfbd_guard.engine.config import PipelineConfig
    from sfbd_guard.engine.service import train

    prepared = chain[0]
    run = tmp_path / "run"
    train(PipelineConfig.model_validate(tiny_pipeline(prepared, run)), resume=False)

    def errors(name: str, executor: ExecutorSpec, workers: int | None = None) -> tuple[Any, np.ndarray]:
        config = resolve_audit_config(None, {"membership.max_images": 24, "membership.batch": 8, "membership.draws": 2,
                                             "membership.sigmas": [0.1, 0.4], "membership.workers": workers,
                                             "membership.bootstrap": 200})
        result = run_membership(run=run, report=tmp_path / name, config=config, executor=executor)
        table = pq.read_table(tmp_path / name / "membership.parquet")
        return result.summary, np.asarray(table.column("errors").to_pylist())

    one, one_errors = errors("one", RAY, workers=1)
    two, two_errors = errors("two", RAY, workers=2)
    _local, local_errors = errors("local", LOCAL)
    assert one_errors.shape == (24 * 3, 2)
    assert np.array_equal(one_errors, two_errors)
    assert one.groups == two.groups and one.scores_sha256 == two.scores_sha256
    np.testing.assert_allclose(local_errors, one_errors, rtol=1e-4)
