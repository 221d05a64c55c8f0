"""Progress reporting: one shape for every long piece of work.

A `ProgressFactory` is called with a label and a total when a piece of work starts ("decoding", 1797)
and returns a `Tick`, called with how many items were done since the last call. The library takes a
factory (or None) and never draws anything itself; the CLI passes `terminal_progress`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

Tick = Callable[[int], None]
ProgressFactory = Callable[[str, int], Tick]


def terminal_progress(label: str, total: int) -> Tick:
    """A tqdm bar on stderr, shown on a terminal only, closed when the total is reached."""
    from tqdm import tqdm

    bar = tqdm(total=total, desc=label, unit="img", file=sys.stderr, dynamic_ncols=True, leave=False,
               disable=None)  # None: shown on a terminal only

    def tick(done: int) -> None:
        bar.update(done)
        if bar.n >= total:
            bar.close()

    return tick
