"""`guard prepare` as one library call that also records its ledger event."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..contracts.base import dump
from ..executor import LOCAL, ExecutorSpec
from ..hashing import json_sha256
from ..ledger import Artifact, current_head, ledger_dir, recorded
from ..policy.model import load_policy
from ..progress import ProgressFactory
from .prepare import PrepareResult, prepare


def prepare_recorded(policy_path: Path, *, data_root: Path | None, out: Path | None, workers: int, strict: bool,
                     overwrite: bool, ledger: Path | None, command: list[str], key_file: Path | None = None,
                     ephemeral_key: bool = False, allow_rerelease: bool = False, progress: ProgressFactory | None = None,
                     sign_key: Path | None = None, executor: ExecutorSpec = LOCAL,
                     overrides: dict[str, Any] | None = None) -> PrepareResult:
    """Load the policy (with `overrides`, dotted keys from `--set`, applied), prepare the data, and append a
    `prepare` event to the ledger (ok or failed).

    With `sign_key` (an Ed25519 private key, checked before any work), card.json is signed into card.sig. The event
    records the overrides and the sha256 of the policy as applied (card.json's `policy`, as sorted JSON)."""
    from ..keys.signing import load_private_key, sign_card

    where = ledger_dir(ledger)
    with recorded(where, "prepare", command, sign_key) as event:
        event.inputs.append(Artifact("policy", str(policy_path.resolve()), None))
        key = load_private_key(sign_key) if sign_key is not None else None
        if overrides:
            event.summary["policy_overrides"] = dict(overrides)  # also in a failed event: what was asked
        loaded = load_policy(policy_path, overrides)
        event.inputs[0] = Artifact("policy", str(loaded.path.resolve()), loaded.sha256)
        result = prepare(loaded, data_root=data_root, out=out, workers=workers, strict=strict,
                         overwrite=overwrite, key_file=key_file, ephemeral_key=ephemeral_key,
                         allow_rerelease=allow_rerelease, event_id=event.event_id, progress=progress, executor=executor,
                         ledger_head=current_head(where).as_dict())
        card = result.card
        if key is not None:
            event.summary["signed_by"] = sign_card(result.output, key)
        output = result.output.resolve()  # the ledger stores paths inside the project relative to it (ledger.py)
        root = card.source_root(output)
        event.inputs.append(Artifact("source", str(root) if root else card.format, result.source_fingerprint))
        event.outputs.append(Artifact("prepared", str(output), card.fingerprint))
        event.outputs.extend(Artifact("array", f"{output}/{name}", digest) for name, digest in sorted(card.files.items()))
        event.summary.update(  # contracts/events.py PrepareSummary
            policy_name=card.policy_name, format=card.format, split=card.split, sigma=card.sigma,
            noise_key_id=card.noise_key_id, noise_key_source=card.noise_key_source,
            resolution=card.resolution, counts=dict(card.counts), rule_counts=dict(card.rule_counts),
            errors=len(result.errors), seconds=round(result.seconds, 3), register_sha256=result.register_sha256,
            policy_resolved_sha256=json_sha256(dump(card.policy)),
        )
        if card.rerelease is not None:
            event.summary["rerelease"] = card.rerelease.model_dump(mode="json")
        if result.register_file is not None:  # owner-side: the path names the owner's config folder, never a key
            event.inputs.append(Artifact("register", str(result.register_file), result.register_sha256))
        return result
