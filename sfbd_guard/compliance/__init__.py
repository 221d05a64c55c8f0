"""Compliance reports from the ledger: tables, an HTML page, a datasheet, and `guard verify`."""
