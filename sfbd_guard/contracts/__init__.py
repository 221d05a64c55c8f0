"""The files the tool's parts exchange, as types: each with one reader and one writer. Import
them from their modules (this package re-exports nothing, so importing one contract loads no other).

- card.json of a prepared directory: `Card`, `read_card`, `write_card` (prepared/card.py, beside its directory)
- run.json of a run directory: `RunRecord`, `read_run_record`, `write_run_record` (run_record.py)
- summary.json of an audit report: `AuditSummary`, `read_audit_summary`, `write_audit_summary` (audit_summary.py)
- ledger events: `Event` and one summary model per kind, `read_events`; written by `ledger.write_event` (events.py)

A missing, corrupt or mistyped key is a GuardError (exit 2) whose one line names the file and the key.
Imports pydantic only (no numpy, no torch), so `guard --help` stays fast.
"""
