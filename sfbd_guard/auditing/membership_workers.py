"""Where `guard membership` computes denoising errors: in this process (`local`), or by Ray actors (`ray`), each
loading the model once from the run's weights file (which every node must see, as for the sample audit).

Work goes to the actors in units of whole batches (`membership.batch` rows, counted from the start of each group as
the local loop counts them), so every image is denoised in the same batch as with any other number of workers, and
the errors are the same with 1 or many (each actor runs torch with one thread). At most two units per actor are in
flight; results come back in order. An actor whose process dies is restarted and its units sent again: the errors
are a pure function of the pixels, the weights and the common noise.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from ..executor import ExecutorSpec, cluster_cpus, ordered_remote_map, ray_get, ray_session
from .membership import Progress, denoising_errors

MAX_RESTARTS = 3
IN_FLIGHT_PER_ACTOR = 2
UNIT_BATCHES = 1  # batches per unit of work

Errors = Callable[[np.ndarray, Progress | None], np.ndarray]  # uint8 images (n, C, H, W) -> (n, levels)


class ErrorWorker:
    """The actor: one model, loaded once in the actor's process from the run's weights."""

    def __init__(self, run: str, weights: str, sigmas: list[float], noise: np.ndarray, batch: int) -> None:
        import torch

        from ..engine.service import load_ema_net

        torch.set_num_threads(1)
        self.net, _, _ = load_ema_net(Path(run), checkpoint=Path(weights), device="cpu")
        self.sigmas, self.noise, self.batch = sigmas, noise, batch

    def errors(self, pixels: np.ndarray) -> np.ndarray:
        return denoising_errors(self.net, pixels, self.sigmas, self.noise, batch=self.batch)


def _units(pixels: np.ndarray, rows: int) -> Iterator[np.ndarray]:
    for start in range(0, len(pixels), rows):
        yield pixels[start : start + rows]


@contextmanager
def error_session(net: Any, run: Path, weights: Path, sigmas: list[float], noise: np.ndarray, batch: int,
                  executor: ExecutorSpec, workers: int | None = None) -> Iterator[Errors]:
    """What computes a group's errors for the model `net` (loaded from `weights` of `run`): `net` itself here, or
    `workers` Ray actors (default one per cluster CPU) that load it again."""
    if not executor.is_ray:
        yield lambda pixels, progress: denoising_errors(net, pixels, sigmas, noise, batch=batch, progress=progress)
        return
    with ray_session(executor) as ray:
        worker = ray.remote(num_cpus=1, max_restarts=MAX_RESTARTS, max_task_retries=MAX_RESTARTS)(ErrorWorker)
        count = max(1, workers or cluster_cpus(ray))
        # the common noise is an argument of each actor (no ObjectRef of ours that could go out of scope on a restart)
        actors = [worker.remote(str(run), str(weights), sigmas, noise, batch) for _ in range(count)]
        turn = iter(range(1 << 62))

        def submit(unit: np.ndarray) -> Any:
            return actors[next(turn) % len(actors)].errors.remote(unit)

        def errors(pixels: np.ndarray, progress: Progress | None) -> np.ndarray:
            parts = []
            for part in ordered_remote_map(ray, submit, _units(pixels, batch * UNIT_BATCHES), IN_FLIGHT_PER_ACTOR * count):
                parts.append(part)
                if progress:
                    progress(len(part))
            return np.concatenate(parts) if parts else np.zeros((0, len(sigmas)), np.float64)

        try:
            ray_get(ray, actors[0].errors.remote(noise[:0, 0].reshape(0, *noise.shape[2:]).astype(np.uint8)))
            yield errors
        finally:
            for actor in actors:
                ray.kill(actor)
