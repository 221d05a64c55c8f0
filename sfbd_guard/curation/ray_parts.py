"""`guard prepare --executor ray`: the local pool's part work as Ray tasks.

Each part is one Ray task that does exactly what a local worker does (decode.process_part: read, decode,
transform, hash, noise, write the part's own shards into the staging folder) and returns the same small
PartResult; the driver collects the results in part order, names the shards and writes the manifest and
the card, as with the local pool. So the output is byte-identical to `--executor local`.

- The staging folder must be on storage every node sees at the same path (docs/scale-out.md).
- The noise key travels as a task argument, in memory: it is small, so Ray inlines it in the task
  specification instead of putting it in the object store (which may spill to disk). It is never written
  to a file by this tool; Ray holds it in the memory of the driver, the raylets and the worker processes
  while the tasks run. Use TLS for `ray://` and the cluster's own traffic on an untrusted network.
- A worker process that dies mid-task (killed, out of memory, its node lost) makes Ray run the task again
  (`max_retries`). A retry first deletes what the dead attempt left of its part (the part's temporary shard
  names are fixed: `<partition>/.part-<part>-<k>.npy`), then writes them again, so no row is duplicated.
  An error the task raises itself (a bad dataset) is not retried: it stops the prepare, as locally.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import pyarrow as pa

from ..datasets import DatasetReader, Part, SourceSpec, open_reader
from ..executor import ordered_remote_map
from .decode import NoiseParams, PartResult, PartTask, embeddings_name, process_part

MAX_RETRIES = 3  # Ray re-runs a task this many times when its worker process dies
IN_FLIGHT_PER_CPU = 2  # tasks submitted and not yet collected, per cluster CPU (the local pool's window)

# A worker process keeps the reader it opened for the tasks it runs after the first (as the local pool's
# initializer does): opening a reader may list a dataset.
_readers: dict[SourceSpec, DatasetReader] = {}


def _reader(spec: SourceSpec) -> DatasetReader:
    if spec not in _readers:
        _readers.clear()
        _readers[spec] = open_reader(spec)
    return _readers[spec]


def clear_leftovers(task: PartTask) -> None:
    """Delete the temporary files an earlier, dead attempt at this part may have left in the staging folder."""
    prefix = f".part-{task.part.index:06d}-"
    for partition in ("clean", "protected"):
        folder = task.staging / partition
        if folder.is_dir():
            for path in folder.iterdir():
                if path.name.startswith(prefix):
                    path.unlink(missing_ok=True)
    (task.staging / embeddings_name(task.part.index)).unlink(missing_ok=True)


def decode_part(spec: SourceSpec, task: PartTask, noise: NoiseParams) -> PartResult:
    """The Ray task: one part, as a local worker does it (after clearing a dead attempt's leftovers)."""
    clear_leftovers(task)
    return process_part(_reader(spec), task, noise)


def part_metadata(spec: SourceSpec, part: Part) -> pa.Table:
    """The Ray task of the metadata pass of a streamed reader: one part's rows."""
    return _reader(spec).part_metadata(part)


class RayParts:
    """Runs prepare's part work as Ray tasks on an initialised Ray (executor.ray_session)."""

    def __init__(self, ray: Any, spec: SourceSpec, window: int) -> None:
        self.ray, self.spec, self.window = ray, spec, window
        self._decode = ray.remote(num_cpus=1, max_retries=MAX_RETRIES)(decode_part)
        self._metadata = ray.remote(num_cpus=1, max_retries=MAX_RETRIES)(part_metadata)

    def metadata(self, parts: Iterable[Part]) -> Iterator[pa.Table]:

        spec = self.ray.put(self.spec)
        return ordered_remote_map(self.ray, lambda part: self._metadata.remote(spec, part), parts, self.window)

    def decode(self, jobs: Iterable[tuple[PartTask, NoiseParams]]) -> Iterator[PartResult]:

        spec = self.ray.put(self.spec)
        return ordered_remote_map(self.ray, lambda job: self._decode.remote(spec, *job), jobs, self.window)
