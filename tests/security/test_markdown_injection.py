"""Markdown injection: licence values (a dataset's metadata), the policy's name and its rule names are quoted by
the datasheet and both Hugging Face cards. Each must stay the text it is where it lands: one table cell (a licence
of `| protected | MIT | clean | 999 |` forges no composition row), no heading or rule from a name with newlines,
no live HTML from `<script>`; the YAML front matter keeps its keys. The documents are parsed (markdown-it with GFM
tables, huggingface_hub's card loader), not string-matched. `guard report`'s terminal tables print the same names
as text (no rich markup, no escape sequence)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from helpers import guard, tiny_pipeline, write_image_set, write_policy

FORGED_ROWS = "| protected | MIT | clean | 999 |"
SCRIPT = "<script>alert(1)</script>"
LICENCES = [FORGED_ROWS, SCRIPT, "MIT\n# Injected licence heading\n---\n| forged | row |", "cc\\|by `x` [l](http://e) *b*"]
POLICY_NAME = "demo\n# Injected policy heading\n---\n<img src=x onerror=alert(1)>\n---[/]\x1b[2J"  # rich markup, a terminal escape
RULE_NAMES = ["opt | out | 999 |", "<b>held</b>\n## Injected rule heading", "--- licensed", "# rest"]


@pytest.fixture(scope="module")
def documents(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("inject")
    root = write_image_set(folder / "set", 40, size=16, formats=("imagefolder",))["imagefolder"]
    lines = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]
    for i, row in enumerate(lines):
        row["license"] = LICENCES[i % len(LICENCES)]
    (root / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in lines))
    policy = {"version": 1, "name": POLICY_NAME, "dataset": {"format": "imagefolder", "root": str(root), "resolution": 8},
              "rules": [{"name": RULE_NAMES[0], "action": "exclude", "where": "opt_out = true AND caption <> '|x|'"},
                        {"name": RULE_NAMES[1], "action": "exclude", "sample": {"fraction": 0.1, "seed": 1}},
                        {"name": RULE_NAMES[2], "action": "clean", "sample": {"fraction": 0.3}},
                        {"name": RULE_NAMES[3], "action": "protect"}],
              "noise": {"sigma": 0.6}, "output": str(folder / "prepared")}
    write_policy(folder / "policy.yaml", policy)
    pipeline = write_policy(folder / "pipeline.yaml", tiny_pipeline(
        folder / "prepared", folder / "run", policy=str(folder / "policy.yaml"), sample={"n": 4, "steps": 2, "batch": 4}))
    ledger = folder / "ledger"
    assert guard("run", pipeline, "--ledger", ledger) == 0
    assert guard("report", "--ledger", ledger, "--run", folder / "run", "--datasheet", folder / "sheet.md",
                 "--model-card", folder / "model", "--dataset-card", folder / "data") == 0
    return {"ledger": ledger, "sheet": folder / "sheet.md", "model": folder / "model" / "README.md", "data": folder / "data" / "README.md",
            "card": json.loads((folder / "prepared" / "card.json").read_text())}


def _parse(text: str) -> list[Any]:
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark").enable("table").parse(text)


def _tables(tokens: list[Any]) -> list[list[list[str]]]:
    """Each table as rows of cells (the header first), each cell its rendered plain text."""
    tables: list[list[list[str]]] = []
    row_cells: list[str] = []
    inside = False
    for token in tokens:
        if token.type == "table_open":
            tables.append([])
        elif token.type == "tr_open":
            row_cells = []
        elif token.type in ("th_open", "td_open"):
            inside = True
        elif token.type == "inline" and inside:
            row_cells.append(_plain(token))
            inside = False
        elif token.type in ("th_close", "td_close") and inside:  # an empty cell has no inline token
            row_cells.append("")
            inside = False
        elif token.type == "tr_close":
            tables[-1].append(row_cells)
    return tables


def _plain(inline: Any) -> str:
    return "".join(child.content for child in inline.children or [] if child.type in ("text", "code_inline", "softbreak"))


def _assert_inert(text: str, where: str) -> list[Any]:
    tokens = _parse(text)
    kinds = {token.type for token in tokens} | {c.type for t in tokens for c in (t.children or [])}
    assert not kinds & {"html_block", "html_inline", "hr", "link_open", "image"}, (where, kinds)
    headings = [_plain(tokens[i + 1]) for i, t in enumerate(tokens) if t.type == "heading_open"]
    assert not any(h.startswith("Injected") for h in headings), (where, headings)  # a name is one heading's text, whole
    return tokens


def _licence_rows(tables: list[list[list[str]]]) -> list[list[str]]:
    table = next(t for t in tables if t[0][:2] == ["partition", "licence (SPDX)"])
    return table[1:]


def test_the_datasheet_quotes_hostile_values_as_text(documents: dict[str, Any]) -> None:
    tokens = _assert_inert(documents["sheet"].read_text(), "datasheet")
    tables = _tables(tokens)
    rows = _licence_rows(tables)
    card_counts = documents["card"]["counts"]
    assert sum(int(r[2]) for r in rows) == sum(card_counts[p] for p in ("clean", "protected", "excluded", "error"))
    assert {r[0] for r in rows} <= {"clean", "protected", "excluded", "error"}, rows
    assert {r[1] for r in rows} == {" ".join(lic.replace("\n", " ").split()) for lic in LICENCES}, "each licence verbatim, in one cell"
    rules = next(t for t in tables if t[0][0] == "rule")
    assert [r[0] for r in rules[1:]] == [" ".join(n.split()) for n in RULE_NAMES], "one row per rule, its name verbatim"
    assert all(len(r) == 4 for r in rules), rules
    assert "opt_out = true AND caption <> '|x|'" in rules[1][2], "the where clause verbatim, pipes and all"
    assert sum(t.type == "heading_open" and t.tag == "h1" for t in tokens) == 1


@pytest.mark.parametrize("which", ["model", "data"])
def test_the_hugging_face_cards_quote_hostile_values_as_text_and_keep_their_metadata(documents: dict[str, Any],
                                                                                     which: str) -> None:
    from huggingface_hub import DatasetCard, ModelCard

    card = (ModelCard if which == "model" else DatasetCard).load(documents[which])
    meta = card.data.to_dict()
    expected = ({"license", "license_name", "datasets", "tags", "pipeline_tag", "library_name", "sfbd_guard"}
                if which == "model" else
                {"license", "pretty_name", "size_categories", "task_categories", "tags", "sfbd_guard"})
    assert set(meta) == expected, meta
    assert (meta["datasets"] if which == "model" else [meta["pretty_name"]]) == [POLICY_NAME], "the YAML keeps the name as is"
    tokens = _assert_inert(card.text, which)
    rows = _licence_rows(_tables(tokens))
    assert sum(int(r[2]) for r in rows) == sum(documents["card"]["counts"][p] for p in ("clean", "protected", "excluded", "error"))
    assert {r[0] for r in rows} <= {"clean", "protected", "excluded", "error"}, rows
    assert sum(t.type == "heading_open" and t.tag == "h1" for t in tokens) == 1


def test_the_escapes_round_trip_through_a_markdown_parser() -> None:
    """Any single line of text (control characters aside) renders back to itself, in prose, a heading, a cell or
    a code span."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from sfbd_guard.compliance.markdown import code, one_line, text

    @settings(max_examples=300, deadline=None)
    @given(st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40))
    def check(value: str) -> None:
        line = one_line(value)
        expect = " ".join(line.split()) if line else ""
        for doc, pick in ((f"{text(value)}\n", "p"), (f"# {text(value)}\n", "h"),
                          (f"| a |\n|---|\n| {text(value)} |\n", "t"), (f"x {code(value)}\n", "c"),
                          (f"| a |\n|---|\n| {code(value, cell=True)} |\n", "tc")):
            tokens = _parse(doc)
            assert not {t.type for t in tokens} & {"html_block", "hr", "bullet_list_open", "ordered_list_open",
                                                    "blockquote_open", "code_block"}, (value, doc)
            inlines = [t for t in tokens if t.type == "inline"]
            got = _plain(inlines[-1]) if inlines else ""
            if pick == "c":
                got = got[2:]
            assert " ".join(got.split()) == expect or (pick == "h" and not expect), (value, doc, got)

    check()


def test_the_terminal_tables_print_hostile_names_as_text(documents: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    """`guard report` prints the policy name as it is: `[/]` is not rich markup (it raised a MarkupError, a
    traceback), an escape sequence reaches no terminal."""
    capsys.readouterr()
    assert guard("report", "--ledger", documents["ledger"]) == 0
    out = capsys.readouterr().out
    assert "[/]" in out and "\x1b" not in out and "\\x1b[2J" in out, out
