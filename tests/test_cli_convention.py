"""One CLI convention (issue 30, part 4): --out for every output (old names kept as hidden aliases), -V/--version,
one exit-code table (help, docs, code), typer's shell completion, prepare --set, 'did you mean' on the main line,
a missing metadata file said as missing."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from fixtures.synthetic import write_imagefolder
from helpers import digits_policy, read_events, tiny_pipeline, write_policy
from sfbd_guard.errors import DataError, GuardError, InputError, VerificationError
from sfbd_guard.exitcodes import MEANINGS, ExitCode

DOCS = Path(__file__).resolve().parents[1] / "docs" / "cli.md"


def _one_line(result: Any, code: int, *fragments: str) -> str:
    """`error: ...` on one line (and at most a hint), no traceback, exit `code`; the line holds every fragment."""
    assert result.code == code, (result.code, result.out, result.err)
    lines = result.err.strip().splitlines()
    assert lines and lines[0].startswith("error: ") and "Traceback" not in result.err, result.err
    assert len(lines) == 1 or (len(lines) == 2 and lines[1].startswith("hint: ")), result.err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


# ---- the exit-code table: one in the code, shown by guard --help and docs/cli.md --------------------------------

def test_exit_codes_are_one_table_in_code_help_and_docs(cli, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    assert [int(code) for code in ExitCode] == [0, 1, 2, 3, 130]
    assert (GuardError.exit_code, DataError.exit_code, VerificationError.exit_code, InputError.exit_code) == (1, 1, 1, 2)
    monkeypatch.setenv("COLUMNS", "200")
    page = cli("--help").out
    tail = page[page.index("Exit codes"):]
    for code in ExitCode:
        assert re.search(rf"^\s*{int(code)}\s+{re.escape(MEANINGS[code])}\s*$", tail, re.M), (code, tail)
    docs = DOCS.read_text()
    for code in ExitCode:
        assert re.search(rf"^\| {int(code)} \| {re.escape(MEANINGS[code])}", docs, re.M), f"docs/cli.md: exit {int(code)}"


def test_version_short_and_long_and_typers_completion(cli, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    from sfbd_guard import __version__

    assert cli("-V").out.strip() == cli("--version").out.strip() == f"sfbd_guard {__version__}"
    page = cli("--help").out
    assert "--install-completion" in page and "--show-completion" in page and "-V" in page
    # typer detects the shell from the process tree (shellingham), which a test run may not have (CI, nohup):
    # name it instead, as typer's own tests do
    monkeypatch.setenv("_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION", "1")
    shown = cli("--show-completion", "bash")
    assert shown.code == 0 and "_GUARD_COMPLETE" in shown.out and "complete" in shown.out


# ---- --out everywhere; the old names still work, hidden ----------------------------------------------------------

def _stop_with(name: str):  # type: ignore[no-untyped-def]
    """A stand-in for an api function that stops with the output folder it was given (no work done)."""
    def stop(*_: object, report: Path, **__: object) -> None:
        raise InputError(f"{name} report={report}")
    return stop


@pytest.mark.parametrize("command", ["audit", "membership"])
def test_out_and_its_old_name_report_both_work(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
                                               command: str) -> None:
    from sfbd_guard import api

    monkeypatch.setattr(api, command, _stop_with(command))
    first = ["--samples", tmp_path, "--data", tmp_path] if command == "audit" else ["--run", tmp_path]
    default = "audit-report" if command == "audit" else "membership-report"
    for option in ("--out", "--report"):
        _one_line(cli(command, *first, option, tmp_path / "r"), 2, f"{command} report={tmp_path / 'r'}")
    _one_line(cli(command, *first), 2, f"{command} report={default}")
    _one_line(cli(command, *first, "--out", tmp_path / "a", "--report", tmp_path / "b"), 2, "--report is its old name")
    page = cli(command, "--help").out
    assert "--out" in page and "--report" not in page and default in page


def test_report_out_output_format_html_and_old_html(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ledger = tmp_path / "ledger"
    assert cli("prepare", "--policy", write_policy(tmp_path / "p.yaml", digits_policy(tmp_path / "prepared", drop=0.9)),
               "--ledger", ledger).code == 0
    for option in ("--out", "--output"):
        written = tmp_path / f"{option.strip('-')}.csv"
        assert cli("report", "--ledger", ledger, "--sql", "SELECT policy FROM prepares", "--format", "csv", option,
                   written).code == 0
        assert written.read_text().splitlines() == ['"policy"', '"digits"']
    new = cli("report", "--ledger", ledger, "--format", "html", "--out", tmp_path / "new.html")
    old = cli("report", "--ledger", ledger, "--html", tmp_path / "old.html")
    assert new.code == old.code == 0, (new.err, old.err)
    for page in ("new.html", "old.html"):
        assert "<html" in (tmp_path / page).read_text().lower()
    _one_line(cli("report", "--ledger", ledger, "--format", "html"), 2, "--format html", "--out FILE")
    _one_line(cli("report", "--ledger", ledger, "--format", "html", "--out", tmp_path / "x.html", "--sql", "SELECT 1"),
              2, "--sql")
    _one_line(cli("report", "--ledger", ledger, "--out", tmp_path / "a", "--output", tmp_path / "b"), 2, "--output")
    page = cli("report", "--help").out
    assert "--out" in page and "--output" not in page and "--html" not in page


# ---- exit codes of failures ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("raised, code, fragment", [
    (VerificationError("prepared/clean/shard-00000.npy does not match the sha256 recorded at prepare time"), 1, "sha256"),
    (InputError("bad"), 2, "bad"),
    (FileNotFoundError(2, "No such file or directory", "/gone/metadata.csv"), 2, "/gone/metadata.csv: missing"),
])
def test_a_failed_check_exits_1_bad_input_2(cli, monkeypatch: pytest.MonkeyPatch, raised: BaseException,  # type: ignore[no-untyped-def]
                                            code: int, fragment: str) -> None:
    from sfbd_guard import api

    def fail(*_: object, **__: object) -> None:
        raise raised

    monkeypatch.setattr(api, "report", fail)
    _one_line(cli("report"), code, fragment)


@pytest.mark.parametrize("raised", [KeyboardInterrupt, "abort"])
def test_ctrl_c_and_an_abort_exit_130(cli, monkeypatch: pytest.MonkeyPatch, raised: Any) -> None:  # type: ignore[no-untyped-def]
    import typer

    from sfbd_guard import api

    def stop(*_: object, **__: object) -> None:
        raise typer.Abort() if raised == "abort" else raised()

    monkeypatch.setattr(api, "report", stop)
    result = cli("report")
    assert result.code == 130 and "Traceback" not in result.err


# ---- prepare --set ------------------------------------------------------------------------------------------------

def test_prepare_set_is_validated_and_recorded_in_card_and_event(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from sfbd_guard.hashing import json_sha256
    from sfbd_guard.prepared.card import read_card

    policy = write_policy(tmp_path / "p.yaml", digits_policy(tmp_path / "plain", drop=0.9))
    ledger = tmp_path / "ledger"
    assert cli("prepare", "--policy", policy, "--ledger", ledger).code == 0  # without --set: no key in the card
    plain = json.loads((tmp_path / "plain" / "card.json").read_text())
    assert "policy_overrides" not in plain and plain["sigma"] == 0.6 and read_card(tmp_path / "plain").policy_overrides is None
    summary = json.loads(read_events(ledger).to_pylist()[-1]["summary"])
    assert "policy_overrides" not in summary and summary["policy_resolved_sha256"] == json_sha256(plain["policy"])

    # the same images at another sigma are a re-release (the owner's register): allowed here, to see --set recorded
    result = cli("prepare", "--policy", policy, "--out", tmp_path / "set", "--set", "noise.sigma=0.8",
                 "--set", "dedup.enabled=false", "--allow-rerelease", "--ledger", ledger)
    assert result.code == 0, result.err
    card = json.loads((tmp_path / "set" / "card.json").read_text())
    assert card["policy_overrides"] == {"noise.sigma": 0.8, "dedup.enabled": False}
    assert card["policy"]["noise"]["sigma"] == card["sigma"] == 0.8 and card["dedup"] == {"enabled": False}
    assert card["policy_sha256"] == plain["policy_sha256"], "the file's sha256; the overrides are beside it"
    assert read_card(tmp_path / "set").policy_overrides == {"noise.sigma": 0.8, "dedup.enabled": False}
    event = read_events(ledger).to_pylist()[-1]
    summary = json.loads(event["summary"])
    assert event["status"] == "ok" and summary["policy_overrides"] == card["policy_overrides"]
    assert summary["policy_resolved_sha256"] == json_sha256(card["policy"]) != json_sha256(plain["policy"])
    pipeline = write_policy(tmp_path / "pipe.yaml", tiny_pipeline(tmp_path / "set", tmp_path / "run", policy=str(policy)))
    _one_line(cli("run", pipeline, "--ledger", ledger), 2, "with --set")  # guard run applies the file as it is
    assert not (tmp_path / "run").exists()

    for bad, fragment in ((["--set", "noise.sigm=1"], "noise.sigm: unknown key (did you mean sigma?)"),
                          (["--set", "noise.sigma=-1"], "noise.sigma:"), (["--set", "sigma"], "expected KEY=VALUE"),
                          (["--set", "noise=3"], "noise:")):
        _one_line(cli("prepare", "--policy", policy, "--out", tmp_path / "bad", *bad, "--ledger", ledger), 2, fragment)
    assert not (tmp_path / "bad").exists()
    failed = json.loads(read_events(ledger).to_pylist()[-1]["summary"])
    assert failed["policy_overrides"] == {"noise": 3}, "a failed prepare records what --set asked for"


# ---- a misspelt key on the main line ------------------------------------------------------------------------------

def test_a_misspelt_key_is_the_main_line_with_did_you_mean(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    policy = digits_policy(tmp_path / "out")
    policy["noise"] = {"sigm": 0.6}  # also leaves noise.sigma missing: the misspelling is what to fix
    line = _one_line(cli("prepare", "--policy", write_policy(tmp_path / "p.yaml", policy)), 2,
                     "noise.sigm: unknown key (did you mean sigma?)")
    assert "required" not in line
    pipeline = tiny_pipeline(tmp_path / "prepared", tmp_path / "run")
    pipeline["dat"] = pipeline.pop("data")
    _one_line(cli("train", "--pipeline", write_policy(tmp_path / "pipe.yaml", pipeline)), 2,
              "dat: unknown key (did you mean data?)")


# ---- a missing metadata file --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["metadata.csv", "metadata.parquet"])
def test_a_missing_metadata_file_is_said_as_missing(cli, tmp_path: Path, name: str) -> None:  # type: ignore[no-untyped-def]
    """A metadata file that is a symlink to nothing was read as no metadata (its opt-outs lost): exit 2, naming it."""
    root = write_imagefolder(tmp_path / "images", [], extra_images=["a.png", "b.png"])
    (root / name).symlink_to(root / "gone.csv")
    policy = {"version": 1, "name": "folder", "dataset": {"format": "imagefolder", "root": str(root), "resolution": 8},
              "rules": [{"name": "all", "action": "protect"}], "noise": {"sigma": 0.5}, "output": str(tmp_path / "out")}
    _one_line(cli("prepare", "--policy", write_policy(tmp_path / "p.yaml", policy)), 2, "missing", str(root / name))
    assert not (tmp_path / "out").exists()


def test_read_metadata_of_a_file_that_is_not_there(tmp_path: Path) -> None:
    from sfbd_guard.datasets.metadata_file import read_metadata

    with pytest.raises(InputError, match=r"^metadata\.parquet: missing"):
        read_metadata(tmp_path / "metadata.parquet", None, "metadata.parquet")
