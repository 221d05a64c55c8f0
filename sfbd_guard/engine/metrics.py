"""`metrics.parquet` of a run: one row per optimizer step, rewritten atomically at each checkpoint.

On resume, rows after the checkpoint's step are dropped, so a crash never duplicates or loses rows. What was added
since the trainer last handed it to the run's tracker (engine/trackers.py) waits in `unsent`.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..fileio import atomic_write_bytes

_METRICS_FIELDS: list[tuple[str, pa.DataType]] = [
    ("step", pa.int64()), ("kimg", pa.float64()), ("round", pa.int64()), ("phase", pa.string()),
    ("loss", pa.float64()), ("lr", pa.float64()), ("seconds_per_kimg", pa.float64()),
    # SFBD's validation measure (validation.py), on the step after which it was taken; null on other steps
    ("validation", pa.float64()), ("round_psnr", pa.float64()), ("decision", pa.string()),
]
METRICS_SCHEMA = pa.schema(_METRICS_FIELDS)


class MetricsLog:
    def __init__(self, path: Path, rows: list[dict[str, Any]] | None = None) -> None:
        self.path = path
        self.rows = rows or []
        self.unsent: list[dict[str, Any]] = []  # rows, annotations and tracker-only values not yet sent to a tracker

    @classmethod
    def resume(cls, path: Path, up_to_step: int) -> MetricsLog:
        rows = pq.read_table(path).to_pylist() if path.is_file() else []
        return cls(path, [row for row in rows if row["step"] <= up_to_step])

    def append(self, **row: Any) -> None:
        self.rows.append(row)
        self.unsent.append(dict(row))

    def annotate(self, step: int, **values: Any) -> None:
        """Add `values` to the row of `step` (a row of its own when no step has been taken yet); two decisions at one
        step are both kept, joined by "; "."""
        if self.rows and self.rows[-1]["step"] == step:
            earlier = self.rows[-1].get("decision")
            if earlier and values.get("decision"):
                values = {**values, "decision": f"{earlier}; {values['decision']}"}
            self.rows[-1].update(values)
        else:
            self.rows.append({"step": step, **values})
        self.unsent.append({"step": step, **values})

    def track(self, step: int, **values: Any) -> None:
        """Values for the tracker only (not columns of metrics.parquet), e.g. the privacy spent when a phase ends."""
        self.unsent.append({"step": step, **values})

    def take_unsent(self) -> list[dict[str, Any]]:
        """What was appended, annotated or tracked since the last call, in order."""
        taken, self.unsent = self.unsent, []
        return taken

    def last_step(self) -> int:
        """The step of the last row (0 before the first step)."""
        return int(self.rows[-1]["step"]) if self.rows else 0

    def write(self) -> None:
        buffer = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(self.rows, schema=METRICS_SCHEMA), buffer)
        atomic_write_bytes(self.path, buffer.getvalue())
