"""The files the tool's parts exchange, as types: each with one reader and one writer.

- card.json of a prepared directory: `Card`, `read_card`, `write_card` (card.py)
- run.json of a run directory: `RunRecord`, `read_run_record`, `write_run_record` (run_record.py)
- summary.json of an audit report: `AuditSummary`, `read_audit_summary`, `write_audit_summary` (audit_summary.py)
- ledger events: `Event` and one summary model per kind, `read_events`; written by `ledger.write_event` (events.py)

A missing, corrupt or mistyped key is a GuardError (exit 2) whose one line names the file and the key.
Imports pydantic only (no numpy, no torch), so `guard --help` stays fast.
"""

from __future__ import annotations

from .audit_summary import AuditSummary, read_audit_summary, write_audit_summary
from .card import Card, read_card, write_card
from .events import SUMMARIES, Event, EventSummary, read_events
from .run_record import RunRecord, read_run_record, write_run_record

__all__ = ["SUMMARIES", "AuditSummary", "Card", "Event", "EventSummary", "RunRecord", "read_audit_summary",
           "read_card", "read_events", "read_run_record", "write_audit_summary", "write_card", "write_run_record"]
