"""`action: holdout` (issue 25 §2): never trained on, never stored, kept for the audit's calibration; distinct from
`exclude` (opt-outs: never read again, not even by the audit)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import yaml

from helpers import lineage, write_policy
from sfbd_guard.curation import dedup
from sfbd_guard.policy.model import DUPLICATE_RULE, Rule
from sfbd_guard.symmetry import group

RULES = [{"name": "licensed", "action": "clean", "where": "index % 2 = 0"},
         {"name": "held-out", "action": "holdout", "sample": {"fraction": 0.25, "seed": 3}},
         {"name": "opt-out", "action": "exclude", "where": "index < 100"},
         {"name": "rest", "action": "protect"}]


def _policy(tmp_path: Path, rules: list[dict], name: str = "p") -> Path:
    policy = {"version": 1, "name": name, "dataset": {"format": "digits", "resolution": 8}, "rules": rules,
              "noise": {"sigma": 0.6}, "output": str(tmp_path / f"prepared-{name}")}
    return write_policy(tmp_path / f"{name}.yaml", policy)


def test_exclude_decides_first_then_holdout_then_the_licence_rules(tmp_path: Path) -> None:
    """Listed after the licence rule and before the opt-out rule, the holdout still takes a sample of the whole
    pool minus the opt-outs: an opt-out is never held out, and clean records are held out as often as others."""
    import pyarrow as pa

    from sfbd_guard.policy.rules import decide

    metadata = pa.table({"record_id": [f"r{i:04d}" for i in range(1000)], "index": list(range(1000))})
    decisions = decide(metadata, [Rule.model_validate(r) for r in RULES], base_dir=tmp_path, source="test")
    actions = np.asarray(decisions.actions)
    assert (actions[:100] == "exclude").all() and "holdout" in set(actions[100:])
    held = np.flatnonzero(actions == "holdout")
    assert len(held) == round(0.25 * 900)
    assert 0.4 < np.mean(held % 2 == 0) < 0.6  # drawn before the licence rule: even (licensed) records too


def _plan(actions: list[str], clusters: list[int]) -> dedup.Plan:
    codes = np.asarray([dedup.STRICTNESS[a] for a in actions], np.int8)
    ids = pa.array([f"r{i}" for i in range(len(actions))])
    shas = pa.array([f"sha-{c}" for c in clusters])
    return dedup.plan(np.asarray(clusters, np.int64), codes, ids, shas, None, variants=group([]), size=8)


@pytest.mark.parametrize(("actions", "dropped", "demoted"), [
    (["holdout", "protect"], {0}, set()),  # the trained copy stays (and stays in the audit's reference set)
    (["holdout", "clean"], {0}, set()),
    (["exclude", "holdout"], {1}, set()),  # an opt-out's copy is never held out
    (["holdout", "exclude", "protect"], {0}, {2}),  # the others decide as before: the protected copy goes
    (["holdout", "holdout"], set(), set()),  # held-out copies of each other stay held out
])
def test_a_mixed_cluster_drops_the_holdout_record(actions: list[str], dropped: set[int], demoted: set[int]) -> None:
    plan = _plan(actions, [0] * len(actions))
    changed = {row for row, change in plan.changes.items() if change.demoted}
    assert changed == dropped | demoted


def test_prepare_audit_verify_with_a_holdout(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Held-out records: partition excluded without a file, counted on the card, calibrate the audit by themselves
    (no calibration.holdout_rules), and verify does not count them as opt-outs."""
    from sfbd_guard.auditing.config import AuditConfig
    from sfbd_guard.auditing.service import run_audit

    policy = _policy(tmp_path, RULES)
    assert cli("prepare", "--policy", policy, "--ephemeral-key").code == 0
    prepared = tmp_path / "prepared-p"
    card = json.loads((prepared / "card.json").read_text())
    rows = lineage(prepared).to_pylist()
    held = [r for r in rows if r["rule"] == "held-out"]
    assert held and all(r["partition"] == "excluded" and r["file"] is None for r in held)
    assert card["holdout"] == card["rule_counts"]["held-out"] == len(held)
    assert not {r["record_id"] for r in held} & {r["record_id"] for r in rows if r["rule"] == "opt-out"}
    from sfbd_guard.hashing import pixel_sha256

    stored = {pixel_sha256(pixels) for f in card["files"] if f.startswith("clean/")
              for pixels in np.load(prepared / f)}
    assert stored and not stored & {r["sha256"] for r in held}  # no held-out image among the clean arrays
    samples = tmp_path / "samples"
    samples.mkdir()
    from PIL import Image

    Image.fromarray(np.zeros((8, 8), np.uint8)).save(samples / "flat.png")
    result = run_audit(samples=samples, data=prepared, report=tmp_path / "report", config=AuditConfig())
    th = result.summary.thresholds
    assert th.method == "holdout" and th.holdout["source"] == "rules:held-out"
    assert th.holdout["count"] + th.holdout["dropped"]["copy_of_protected"] <= len(held)
    from sfbd_guard.compliance.verify import check_opt_outs
    from sfbd_guard.prepared.reader import read_prepared_card

    class _Prepared:
        root = prepared

    _Prepared.card = read_prepared_card(prepared)  # type: ignore[attr-defined]
    manifest = [dict(r, digest=None) for r in rows]
    check = check_opt_outs(_Prepared, manifest, keyed=True)  # type: ignore[arg-type]
    opted = sum(r["rule"] == "opt-out" for r in rows)
    assert check.passed and check.detail.startswith(f"{opted} record(s) matched by exclude rules (and {len(held)} held-out")


def test_an_old_audit_config_naming_an_exclude_rule_is_refused(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Configs from before `action: holdout` named exclude rules in calibration.holdout_rules: reading those would
    read opt-outs. One clear line, exit 2."""
    rules = [{**RULES[1], "action": "exclude"}, RULES[3]]
    assert cli("prepare", "--policy", _policy(tmp_path, rules, "old"), "--ephemeral-key").code == 0
    (tmp_path / "audit.yaml").write_text(yaml.safe_dump({"version": 1, "calibration": {"holdout_rules": ["held-out"]}}))
    samples = tmp_path / "samples"
    samples.mkdir()
    from PIL import Image

    Image.fromarray(np.zeros((8, 8), np.uint8)).save(samples / "flat.png")
    result = cli("audit", "--config", tmp_path / "audit.yaml", "--samples", samples, "--data", tmp_path / "prepared-old",
                 "--report", tmp_path / "report")
    assert result.code == 2 and "'held-out' is an exclude rule" in result.err and "action: holdout" in result.err
    assert "Traceback" not in result.err


def test_the_shipped_policies_hold_out_and_the_digits_audit_names_no_exclude_rule() -> None:
    root = Path(__file__).resolve().parents[1]
    for name in ("digits", "imagefolder", "imagefolder-licenses"):
        rules = yaml.safe_load((root / "policies" / f"{name}.yaml").read_text())["rules"]
        assert any(r["action"] == "holdout" and "where" not in r for r in rules), name
    assert "holdout_rules" not in (root / "audits" / "digits.yaml").read_text().split("name: digits")[1]
    assert DUPLICATE_RULE == "duplicate"
