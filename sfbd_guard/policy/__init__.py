"""Curation policies: the typed YAML model (`model`) and the rules that decide each record's fate (`rules`).

The audit reads the same rules to keep opt-outs out of its calibration, so they live here, beneath both
curation and the audit.
"""
