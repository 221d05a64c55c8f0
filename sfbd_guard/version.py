"""The package version (a leaf module: the ledger, the card and the reports record it)."""

__version__ = "0.1.0"
