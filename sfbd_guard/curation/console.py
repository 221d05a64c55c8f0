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
    dedup = card.dedup or {}
    if dedup.get("enabled"):
        share = 100 * float(dedup.get("merged_share", 0))
        fine = dedup.get("fine")
        finer = f" and >= {fine.get('threshold')} at {fine.get('size')} px" if isinstance(fine, dict) else ""
        console.print(f"dedup: {dedup.get('merged', 0)} record(s) ({share:.2f} %) merged into {dedup.get('clusters', 0)} "
                      f"cluster(s) of copies (exact, or {dedup.get('embedder')} cosine >= {dedup.get('threshold')}{finer}); "
                      f"{dedup.get('demoted', 0)} demoted to excluded (rule duplicate)")
        if share > 5:
            console.print("[yellow]dedup merged more than 5 % of the records: check dedup.threshold "
                          "(manifest columns dup_cluster, dup_similarity)[/yellow]")
    elif card.dedup is not None:
        console.print("dedup: off (copies of protected or excluded images are not caught)")
    listing = card.listing
    if listing is not None and (listing.images_without_row or listing.rows_without_image):
        files = ", ".join(listing.metadata_files)
        if listing.images_without_row:
            shown = ", ".join(result.listing.images_without_row[:3]) if result.listing else ""
            console.print(f"[yellow]{listing.images_without_row} image(s) have no row in {files}[/yellow] (null "
                          f"metadata: no opt-out of theirs is known){': ' + shown if shown else ''}")
        if listing.rows_without_image:
            shown = ", ".join(list(result.listing.rows_without_image.values())[:3]) if result.listing else ""
            console.print(f"[yellow]{listing.rows_without_image} metadata row(s) name no image[/yellow] "
                          f"({listing.unreadable_rows} unreadable; error rows){': ' + shown if shown else ''}")
    if result.errors:
        first = ", ".join(f"{r} ({why})" for r, why in result.errors[:3])
        console.print(f"[yellow]{len(result.errors)} unreadable record(s) recorded as errors[/yellow]: {first}")
    if result.key_note:
        console.print(result.key_note, markup=False, highlight=False, soft_wrap=True)
    if card.rerelease is not None:
        console.print(f"re-released (--allow-rerelease): {card.rerelease.images} protected image(s) were released "
                      f"before with other noise; their sigma_eff falls to {card.rerelease.min_sigma_eff:.3g} "
                      f"(policy sigma {card.sigma:g}): recorded in the card and the ledger",
                      markup=False, highlight=False, soft_wrap=True)
    console.print(f"fingerprint {card.fingerprint}  ({result.seconds:.1f} s)")
