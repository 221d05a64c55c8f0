"""Markup injection: a ledger value (a failed command's path and message) must not become live HTML in the
compliance report, whatever the command line held."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import guard

PAYLOAD = '"><img src=x onerror=alert(1)>'


def test_a_hostile_path_in_a_failed_event_is_escaped_in_the_report(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    ledger = tmp_path / "ledger"
    assert guard("prepare", "--policy", tmp_path / f"{PAYLOAD}.yaml", "--ledger", ledger) == 2  # a failed event
    capsys.readouterr()
    page = tmp_path / "report.html"
    assert guard("report", "--html", page, "--ledger", ledger) == 0, capsys.readouterr().err
    html = page.read_text()
    assert "onerror=alert(1)" in html.replace("&#34;", '"').replace("&gt;", ">").replace("&lt;", "<"), \
        "the failed event is in the report (else this test checks nothing)"
    assert "<img src=x" not in html and '"><img' not in html
