"""The summary `guard prepare` prints: records per partition and per rule."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from .prepare import PrepareResult


def print_summary(result: PrepareResult, console: Console | None = None) -> None:
    console = console or Console()
    card = result.card
    console.print(f"prepared [bold]{result.output}[/bold]  ({card.format}, split {card.split}, "
                  f"{card.resolution} px, {card.channels} channel(s), sigma {card.sigma})")
    partitions = Table("partition", "records", title="records per partition", title_justify="left")
    for name, count in card.counts.items():
        partitions.add_row(name, str(count))
    rules = Table("rule", "action", "records", title="records per rule", title_justify="left")
    for rule in card.policy.rules:
        rules.add_row(rule.name, rule.action, str(card.rule_counts.get(rule.name, 0)))
    console.print(partitions)
    console.print(rules)
    if result.errors:
        first = ", ".join(f"{r} ({why})" for r, why in result.errors[:3])
        console.print(f"[yellow]{len(result.errors)} unreadable record(s) recorded as errors[/yellow]: {first}")
    if card.noise_key_source == "ephemeral":
        console.print("noise: keyed by a fresh secret that was never stored (no one can regenerate it; "
                      "guard keygen + --noise-key for byte-identical re-runs)")
    else:
        console.print(f"noise: keyed by your key file (key id {str(card.noise_key_id)[:16]}); keep that file away from "
                      "this directory")
    console.print(f"fingerprint {card.fingerprint}  ({result.seconds:.1f} s)")
