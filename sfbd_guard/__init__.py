"""sfbd_guard: train image diffusion models on data with protected content without the model seeing it.

Curation (`prepare`) writes a *prepared directory* whose protected part exists only as fixed
Gaussian-noised copies; training (`train`) reads nothing else; the audit (`audit`) checks generated images
against the protected originals, `membership` asks the trained model itself; every command appends to a
Parquet compliance ledger (`report`, `verify`).
The functions below are the `guard` commands as a library (docs/api.md); importing the package loads no torch.
"""

from .api import (
    LoadedRun,
    audit,
    export,
    load_exported,
    load_run,
    membership,
    prepare,
    report,
    run,
    sample,
    train,
    training_config,
    verify,
)
from .version import __version__

__all__ = ["LoadedRun", "__version__", "audit", "export", "load_exported", "load_run", "membership", "prepare",
           "report", "run", "sample", "train", "training_config", "verify"]
