"""Rule semantics: exclude precedence, first match, grouped sampling, `where` over a CSV list."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from sfbd_guard.errors import ConfigError, InputError
from sfbd_guard.policy.model import Rule, SampleSpec
from sfbd_guard.policy.rules import decide


def _records(count: int = 20) -> pa.Table:
    return pa.table({
        "record_id": [f"r{i:02d}" for i in range(count)],
        "identity": [i // 4 for i in range(count)],  # 5 identities of 4 records
        "license": ["CC0-1.0" if i % 2 else "proprietary" for i in range(count)],
    })


def _rule(name: str, action: str, where: str | None = None, **sample: object) -> Rule:
    return Rule(name=name, action=action, where=where, sample=SampleSpec(**sample) if sample else None)  # type: ignore[arg-type]


def _by_record(table: pa.Table, rules: list[Rule], base: Path = Path(".")) -> dict[str, tuple[str, str]]:
    decisions = decide(table, rules, base_dir=base, source="policy.yaml")
    ids = table.column("record_id").to_pylist()
    return {r: (rule, action) for r, rule, action in zip(ids, decisions.rules, decisions.actions, strict=True)}  # type: ignore[misc]


def test_exclude_rules_apply_first_whatever_their_position() -> None:
    table = _records()
    result = _by_record(table, [_rule("all-clean", "clean"), _rule("opt-out", "exclude", "identity = 2")])
    excluded = {r for r, (_, action) in result.items() if action == "exclude"}
    assert excluded == {"r08", "r09", "r10", "r11"}
    assert all(result[r] == ("all-clean", "clean") for r in result if r not in excluded)


def test_first_matching_rule_in_file_order_decides() -> None:
    result = _by_record(_records(), [
        _rule("open", "clean", "license = 'CC0-1.0'"),
        _rule("identity-0", "protect", "identity = 0"),
        _rule("rest", "protect"),
    ])
    assert result["r01"] == ("open", "clean")  # matches both the first and the second rule
    assert result["r00"] == ("identity-0", "protect")
    assert result["r04"] == ("rest", "protect")


def test_grouped_sampling_keeps_whole_groups_and_falls_through() -> None:
    table = _records()
    result = _by_record(table, [_rule("licensed", "clean", fraction=0.4, seed=3, by="identity"), _rule("rest", "protect")])
    identities = dict(zip(table.column("record_id").to_pylist(), table.column("identity").to_pylist(), strict=True))
    clean_ids = {identities[r] for r, (_, a) in result.items() if a == "clean"}
    assert len(clean_ids) == 2  # round(0.4 × 5 identities)
    for record, (_, action) in result.items():
        assert (action == "clean") == (identities[record] in clean_ids), "groups are kept or dropped whole"


def test_sampling_is_deterministic_and_independent_of_row_order() -> None:
    table = _records()
    rules = [_rule("licensed", "clean", count=3, seed=7), _rule("rest", "protect")]
    forward = _by_record(table, rules)
    backward = _by_record(table.take(list(reversed(range(table.num_rows)))), rules)
    assert forward == backward
    assert sum(a == "clean" for _, a in forward.values()) == 3
    other_seed = _by_record(table, [_rule("licensed", "clean", count=3, seed=8), _rule("rest", "protect")])
    assert other_seed != forward


def test_fraction_keeps_at_least_one_unit() -> None:
    result = _by_record(_records(), [_rule("few", "clean", fraction=0.01), _rule("rest", "protect")])
    assert sum(a == "clean" for _, a in result.values()) == 1


def test_sampling_counts_units_among_records_that_reach_the_rule() -> None:
    table = _records()
    result = _by_record(table, [_rule("opt-out", "exclude", "identity IN (0, 1)"),
                                _rule("licensed", "clean", fraction=1 / 3, by="identity"), _rule("rest", "protect")])
    clean = [r for r, (_, a) in result.items() if a == "clean"]
    assert len(clean) == 4  # one of the 3 identities left, never an excluded one


def test_where_reads_a_csv_relative_to_the_policy(tmp_path: Path) -> None:
    (tmp_path / "optout.csv").write_text("identity\n1\n3\n")
    result = _by_record(_records(), [
        _rule("opt-out", "exclude", "identity IN (SELECT identity FROM read_csv('optout.csv'))"),
        _rule("rest", "protect"),
    ], base=tmp_path)
    assert sorted(r for r, (_, a) in result.items() if a == "exclude") == [f"r{i:02d}" for i in (4, 5, 6, 7, 12, 13, 14, 15)]


def test_undecided_records_are_an_input_error_naming_them() -> None:
    with pytest.raises(InputError, match=r"10 record\(s\) match no rule, e.g. r00, r02, r04"):
        _by_record(_records(), [_rule("open", "clean", "license = 'CC0-1.0'")])


def test_bad_sql_names_the_rule() -> None:
    with pytest.raises(ConfigError, match=r"policy.yaml: rules\[1\].where: .*idenity"):
        _by_record(_records(), [_rule("rest", "protect"), _rule("bad", "clean", "idenity = 3")])


def test_unknown_group_column_names_the_rule() -> None:
    with pytest.raises(ConfigError, match=r"rules\[0\].sample.by: no metadata column 'person'"):
        _by_record(_records(), [_rule("licensed", "clean", fraction=0.5, by="person")])
