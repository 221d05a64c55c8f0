"""sfbd_guard: train image diffusion models on data with protected content without the model seeing it.

Curation (`guard prepare`) writes a *prepared directory* whose protected part exists only as fixed
Gaussian-noised copies; the training engine reads nothing else; the audit checks generated images
against the protected originals; every command appends to a Parquet compliance ledger.
"""

__version__ = "0.1.0"
