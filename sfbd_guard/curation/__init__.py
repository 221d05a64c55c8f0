"""Curation: policies applied to datasets, written as prepared directories."""
