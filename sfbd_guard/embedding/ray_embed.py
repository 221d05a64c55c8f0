"""`guard audit --executor ray`: the embeddings computed by Ray actors, one embedder (model load) per actor.

The driver still reads and hash-verifies the originals and searches the index; the actors embed. Work goes
to the actors in units of whole batches (`embedder.batch` rows, counted from the start of each chunk as
`embed_batched` counts them), so every image is embedded in the same batch as locally and the vectors are
the same. At most two units per actor are in flight; results come back in order.

An actor whose process dies is restarted by Ray (`max_restarts`: it loads its model again) and the units it
held are sent again (`max_task_retries`): embedding is a pure function of the pixels, so a retry changes
nothing. The units are decoded originals, carried by Ray's object store while they are in flight: a Ray
this tool starts has object spilling off, so they stay in memory (on a cluster, see docs/scale-out.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from ..executor import ExecutorSpec, cluster_cpus, ordered_remote_map, ray_get, ray_session
from .embed import Embedder, Progress, embed_batched

MAX_RESTARTS = 3  # an actor is restarted this many times when its process dies
IN_FLIGHT_PER_ACTOR = 2
UNIT_ROWS = 256  # rows per unit of work at least (rounded up to whole batches)


class EmbedWorker:
    """The actor: one embedder, built once from `factory` in the actor's process."""

    def __init__(self, factory: Callable[[], Embedder]) -> None:
        self.embedder = factory()

    def describe(self) -> tuple[str, int, dict[str, Any]]:
        return self.embedder.kind, self.embedder.dim, self.embedder.identity()

    def embed(self, pixels: np.ndarray, batch: int) -> np.ndarray:
        return embed_batched(self.embedder, pixels, batch)


class RayEmbedder:
    """An Embedder (and embed.ParallelEmbedder) whose work is done by `actors` Ray actors."""

    def __init__(self, ray: Any, factory: Callable[[], Embedder], actors: int) -> None:
        self.ray = ray
        worker = ray.remote(num_cpus=1, max_restarts=MAX_RESTARTS, max_task_retries=MAX_RESTARTS)(EmbedWorker)
        self.actors = [worker.remote(factory) for _ in range(max(1, actors))]
        described: tuple[str, int, dict[str, Any]] = ray_get(ray, self.actors[0].describe.remote())
        self.kind, self.dim, self._identity = described
        self._next = 0

    def identity(self) -> dict[str, Any]:
        return self._identity

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        result: np.ndarray = ray_get(self.ray, self._submit(pixels, max(1, len(pixels))))
        return result

    def _submit(self, pixels: np.ndarray, batch: int) -> Any:
        actor = self.actors[self._next % len(self.actors)]
        self._next += 1
        return actor.embed.remote(pixels, batch)

    def _units(self, pixels: np.ndarray, batch: int) -> Iterator[np.ndarray]:
        unit = batch * max(1, -(-UNIT_ROWS // batch))
        for start in range(0, len(pixels), unit):
            yield pixels[start : start + unit]

    def embed_batched(self, pixels: np.ndarray, batch: int, progress: Progress | None = None) -> np.ndarray:
        window = IN_FLIGHT_PER_ACTOR * len(self.actors)
        parts = []
        for vectors in ordered_remote_map(self.ray, lambda unit: self._submit(unit, batch),
                                          self._units(pixels, batch), window):
            parts.append(vectors)
            if progress:
                progress(len(vectors))
        return np.concatenate(parts) if parts else np.zeros((0, self.dim), np.float32)

    def embed_chunks(self, chunks: Iterable[np.ndarray], batch: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Each chunk is one unit (its batches counted from its start, as locally); several chunks in flight."""
        window = IN_FLIGHT_PER_ACTOR * len(self.actors)
        held: list[np.ndarray] = []

        def submit(chunk: np.ndarray) -> Any:
            held.append(chunk)
            return self._submit(chunk, batch)

        for vectors in ordered_remote_map(self.ray, submit, chunks, window):
            yield held.pop(0), vectors

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors = []


@contextmanager
def embedder_session(factory: Callable[[], Embedder], executor: ExecutorSpec) -> Iterator[Embedder]:
    """The embedder of an audit: built here (`local`), or Ray actors, one per cluster CPU (`ray`)."""
    if not executor.is_ray:
        yield factory()
        return
    with ray_session(executor) as ray:
        embedder = RayEmbedder(ray, factory, cluster_cpus(ray))
        try:
            yield embedder
        finally:
            embedder.close()
