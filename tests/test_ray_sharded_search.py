"""knn.knn: the reference set in shards, each searched on its own and the top-k merged, gives exactly the single
flat index's neighbours and scores (FAISS IndexFlatIP / IndexFlatL2), ties included (lower row first)."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest

from sfbd_guard.embedding.knn import Shards, knn


def _flat(refs: np.ndarray, queries: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """One flat FAISS index over every reference, its rows put in (score, row) order among equal scores."""
    index = faiss.IndexFlatIP(refs.shape[1]) if metric == "ip" else faiss.IndexFlatL2(refs.shape[1])
    index.add(refs)
    scores, rows = index.search(queries, k)
    order = np.lexsort((rows, -scores if metric == "ip" else scores), axis=1)
    return np.take_along_axis(rows, order, 1), np.take_along_axis(scores, order, 1)


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_sharded_search_is_the_flat_search_ties_included(metric: str) -> None:
    rng = np.random.default_rng(0)
    base = rng.standard_normal((60, 24)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    refs = np.ascontiguousarray(base[rng.integers(0, 60, 1500)])  # every vector many times: ties everywhere
    queries = np.concatenate([base[:10], rng.standard_normal((70, 24)).astype(np.float32)])
    want_rows, want_scores = _flat(refs, queries, 12, metric)
    for size in (1500, 500, 37, 5):
        rows, scores = knn(queries, Shards.of_array(refs, size), 12, metric=metric, batch=16)  # type: ignore[arg-type]
        np.testing.assert_array_equal(rows, want_rows, err_msg=f"shards of {size}")
        np.testing.assert_array_equal(scores, want_scores, err_msg=f"shards of {size}")
    tied = want_rows[0]
    assert (want_scores[0] == want_scores[0, 0]).all() and (np.diff(tied) > 0).all(), "the test has ties, lower row first"


def test_shards_from_files_fewer_references_than_k_and_gathering_rows(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    refs = rng.standard_normal((7, 4)).astype(np.float32)
    paths = []
    for i, piece in enumerate((refs[:3], refs[3:5], refs[5:])):
        paths.append(tmp_path / f"emb-{i}.npy")
        np.save(paths[-1], piece)
    shards = Shards.files(paths, [3, 2, 2], 4)
    assert shards.shape == (7, 4)
    rows, _ = knn(refs[:2], shards, 10)
    assert rows.shape == (2, 7) and set(rows[0]) == set(range(7))
    np.testing.assert_array_equal(rows, _flat(refs, refs[:2], 7, "ip")[0])
    np.testing.assert_array_equal(shards[np.array([6, 0, 4])], refs[[6, 0, 4]])
    assert knn(refs[:0], shards, 3)[0].shape == (0, 3)
