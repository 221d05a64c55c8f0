"""`guard audit`: do generated images copy protected originals? Embeddings, exact search, calibrated verdicts."""

from __future__ import annotations

from .config import AuditConfig, resolve_audit_config
from .service import AuditResult, audit_recorded, run_audit

__all__ = ["AuditConfig", "AuditResult", "audit_recorded", "resolve_audit_config", "run_audit"]
