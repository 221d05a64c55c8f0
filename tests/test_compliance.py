"""guard run, guard report and guard verify on a tiny real chain: prepare → train → sample → audit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from helpers import guard as _guard
from helpers import lineage, write_chain


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("chain")
    pipeline = write_chain(folder)
    assert _guard("run", pipeline, "--ledger", folder / "ledger") == 0
    assert _guard("key", "export-digest", folder / "digest.key") == 0  # the owner's (this module's), for verifiers
    return folder, folder / "ledger"


def test_run_writes_every_stage(chain: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    folder, ledger = chain
    run = folder / "runs" / "chain"
    for path in ("samples/grid.png", "samples/000007.png", "audit/summary.json", "audit/similarity.png", "report.html", "DATASHEET.md"):
        assert (run / path).is_file(), path
    audit_page = (run / "audit" / "report.html").read_text()
    assert '<a href="../report.html">compliance report</a>' in audit_page, "the audit page links back to the run's report"
    summary = json.loads((run / "audit" / "summary.json").read_text())
    assert summary["thresholds"]["method"] != "default", "calibrated on the held-out rule"
    assert sum(summary["counts"].values()) == 8, "the 8 samples, not the grid"
    assert _guard("run", folder / "pipeline.yaml", "--ledger", ledger) == 0  # everything already done
    out = capsys.readouterr().out
    for stage in ("prepare", "train", "sample", "audit"):
        assert f"{stage}: skipped" in out.replace("   ", " ").replace("  ", " ") or f"{stage}: done (" in out


def test_report_views_formats_html_and_datasheet(chain: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder, ledger = chain
    assert _guard("report", "--ledger", ledger) == 0
    out = capsys.readouterr().out
    assert "datasets prepared (1)" in out and "training runs (2," in out and "audits (1)" in out  # run twice above
    assert _guard("report", "--ledger", ledger, "--sql", "SELECT policy, clean, protected, excluded FROM prepares", "--format", "json") == 0
    (row,) = json.loads(capsys.readouterr().out)
    card = json.loads((folder / "prepared" / "card.json").read_text())
    assert row == {"policy": "digits-chain", **{k: card["counts"][k] for k in ("clean", "protected", "excluded")}}
    assert _guard("report", "--ledger", ledger, "--sql", "SELECT method, steps FROM trainings", "--format", "csv") == 0
    assert capsys.readouterr().out.splitlines() == ['"method","steps"', '"clean-only",8', '"clean-only",8']
    assert _guard("report", "--ledger", ledger, "--sql", "SELECT * FROM audits", "--format", "parquet", "--output", tmp_path / "a.parquet") == 0
    assert pq.read_table(tmp_path / "a.parquet").num_rows == 1
    assert _guard("report", "--ledger", ledger, "--html", tmp_path / "r.html") == 0
    page = (tmp_path / "r.html").read_text()
    assert page.count("data:image/png;base64,") == 1 and page.count("<svg") == 3 and "digits-chain" in page  # grid; charts
    assert _guard("report", "--ledger", ledger, "--datasheet", tmp_path / "d.md", "--run", folder / "runs" / "chain") == 0
    sheet = (tmp_path / "d.md").read_text()
    assert "digits-chain" in sheet and f"{card['counts']['protected']} protected images" in sheet and "opt-out" in sheet
    assert _guard("report", "--ledger", ledger, "--sql", "SELECT nope FROM prepares") == 2


def test_verify_passes_on_the_untouched_run(chain: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    folder, ledger = chain
    assert _guard("verify", "--run", folder / "runs" / "chain", "--ledger", ledger) == 0
    out = capsys.readouterr().out
    assert "10 passed, 1 need attention, 0 failed" in out, "without the digest key the pixel check is not a PASS"
    assert "ATTENTION  no protected pixels: needs the owner's digest key" in out
    assert _guard("verify", "--run", folder / "runs" / "chain", "--ledger", ledger, "--digest-key", folder / "digest.key") == 0
    assert "11 passed, 0 need attention, 0 failed" in capsys.readouterr().out


def _copy(chain: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the chain (its paths inside the project are relative to it, so the copy verifies as it is; the
    ledger's files are not rewritten: that would break its hash chain)."""
    folder, _ = chain
    copy = Path(shutil.copytree(folder, tmp_path / "chain"))
    return copy, copy / "ledger"


def _verify(copy: Path, ledger: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, str]:
    code = _guard("verify", "--run", copy / "runs" / "chain", "--ledger", ledger, "--digest-key", copy / "digest.key")
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("PASS", "FAIL", "ATTENTION"))]
    assert code == (1 if any(line.startswith("FAIL") for line in lines) else 0)
    return {line.split(":")[0].split("  ", 1)[1]: line.split("  ", 1)[0] for line in lines}


def test_verify_fails_when_a_clean_row_is_replaced_by_a_protected_image(chain, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    from sfbd_guard.datasets import SourceSpec, open_reader

    copy, ledger = _copy(chain, tmp_path)
    assert _verify(copy, ledger, capsys) == dict.fromkeys(["ledger chain", "consumed arrays", "provenance", "noise", "noise statistics", "releases", "no protected pixels", "opt-outs", "duplicates", "ledger counts", "audit"], "PASS")
    rows = lineage(copy / "prepared").to_pylist()  # the owner's: record ids of protected images
    protected = next(r for r in rows if r["partition"] == "protected")
    clean_file = copy / "prepared" / "clean" / "shard-00000.npy"
    array = np.load(clean_file)
    array[0] = open_reader(SourceSpec("digits", None, "all", 8)).load(protected["record_id"])
    np.save(clean_file, array)
    result = _verify(copy, ledger, capsys)
    assert result["no protected pixels"] == "FAIL" and result["consumed arrays"] == "FAIL"


def test_verify_fails_for_an_edited_array_and_a_missing_audit(chain, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    copy, ledger = _copy(chain, tmp_path)
    with open(copy / "prepared" / "protected" / "shard-00000.npy", "r+b") as handle:
        handle.seek(-2, 2)
        handle.write(b"\x00\x3c")
    assert _verify(copy, ledger, capsys)["consumed arrays"] == "FAIL"
    for event in (ledger / "audit").glob("*.parquet"):
        event.unlink()
    assert _verify(copy, ledger, capsys)["audit"] == "FAIL"


def test_run_resumes_after_an_interrupted_stage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:  # type: ignore[no-untyped-def]
    from sfbd_guard.stages import STAGES

    pipeline = write_chain(tmp_path)

    def crash(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    (audit,) = [stage for stage in STAGES if stage.name == "audit"]
    monkeypatch.setattr(audit, "run", crash)
    assert _guard("run", pipeline, "--ledger", tmp_path / "ledger") == 130  # interrupted, as by Ctrl-C
    monkeypatch.undo()
    capsys.readouterr()
    assert _guard("run", pipeline, "--ledger", tmp_path / "ledger") == 0
    out = capsys.readouterr().out
    assert "prepare: skipped" in out and "sample: skipped" in out and "audit: done" in out
    assert "train: done (8 steps" in out  # the finished run is resumed and returns at once


def _page_text(page: str) -> str:
    """The page's visible text (no style, no charts, no pictures), one space between words."""
    import html
    import re

    page = re.sub(r"<style>.*?</style>|<svg.*?</svg>", " ", page, flags=re.S)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", page)).split())


def test_the_report_fails_a_chain_with_a_copy_a_failed_stage_and_a_failed_verify_check(chain, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    from helpers import plant_samples

    copy, ledger = _copy(chain, tmp_path)
    run = copy / "runs" / "chain"
    plant_samples(copy / "prepared", run / "planted", copies=2, novel=2)
    assert _guard("audit", "--samples", run / "planted", "--data", copy / "prepared", "--report", run / "planted-audit",
                  "--config", copy / "audit.yaml", "--ledger", ledger) == 3  # a copy found
    hostile = run / "<script>alert(1)</script>"
    assert _guard("audit", "--samples", hostile, "--data", copy / "prepared", "--report", run / "a2", "--ledger", ledger) == 2
    with open(copy / "prepared" / "protected" / "shard-00000.npy", "r+b") as handle:  # verify's arrays check fails
        handle.seek(-2, 2)
        handle.write(b"\x00\x3c")
    capsys.readouterr()
    page_file = tmp_path / "out" / "report.html"
    assert _guard("report", "--ledger", ledger, "--html", page_file, "--datasheet", tmp_path / "out" / "d.md", "--run", run) == 0
    assert "html report:" in capsys.readouterr().out and (tmp_path / "out" / "d.md").is_file()  # both, in one call
    page = page_file.read_text()
    assert "<script>alert(1)" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page  # hostile input escaped
    text = _page_text(page)
    banner = text.split("Run chain: chain", 1)[1].split("Run directory", 1)[0]
    assert banner.split()[0] == "FAIL", banner
    assert "copies found: the latest audit found 2 of 4 generated images" in banner
    assert "a stage failed: audit failed" in banner and "has not completed since" in banner
    assert "a verify check failed: consumed arrays" in banner
    assert text.split("overall")[0].split()[-1] == "FAIL"
    assert 'href="../chain/runs/chain/planted-audit/report.html"' in page  # rows link to artifacts, relative to the page
    assert page.count("<svg") >= 2 and "training loss" in page  # loss and counts charts, inline


def test_the_report_of_the_untouched_chain_passes_and_prints(chain, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, ledger = chain
    page = tmp_path / "r.html"
    assert _guard("report", "--ledger", ledger, "--html", page) == 0
    text = _page_text(page.read_text())
    banner = text.split("Run chain: chain", 1)[1]
    assert banner.split()[0] == "ATTENTION" and "needs the owner's digest key" in banner, "without the key: not PASS"
    assert _guard("report", "--ledger", ledger, "--html", page, "--digest-key", chain[0] / "digest.key") == 0
    text = _page_text(page.read_text())
    assert text.split("Run chain: chain", 1)[1].split()[0] == "PASS"
    assert "@media print" in page.read_text() and "no differential-privacy guarantee" in text


def test_model_and_dataset_cards_parse_with_huggingface_hub_and_carry_the_metadata(chain, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from huggingface_hub import DatasetCard, ModelCard

    folder, ledger = chain
    run = folder / "runs" / "chain"
    assert _guard("report", "--ledger", ledger, "--model-card", tmp_path / "model", "--dataset-card", tmp_path / "data",
                  "--datasheet", tmp_path / "d.md", "--run", run) == 0
    out = capsys.readouterr().out
    assert "model card:" in out and "dataset card:" in out and "datasheet:" in out
    card = ModelCard.load(tmp_path / "model" / "README.md")
    meta = card.data.to_dict()
    assert meta["license"] == "other" and meta["datasets"] == ["digits-chain"] and "sfbd-guard" in meta["tags"]
    assert meta["pipeline_tag"] == "unconditional-image-generation"
    facts = meta["sfbd_guard"]
    prepared = json.loads((folder / "prepared" / "card.json").read_text())
    assert facts["records"] == {k: prepared["counts"][k] for k in ("clean", "protected", "excluded")}
    assert facts["opt_outs_honoured"] == 3 and facts["audit"]["copies"] == 0 and facts["dp"] is None
    assert "Opt-outs honoured: `opt-out`: 3 record(s)" in card.text and "`held-out`: " in card.text
    dataset = DatasetCard.load(tmp_path / "data" / "README.md")
    assert dataset.data.to_dict()["sfbd_guard"]["fingerprint"] == prepared["fingerprint"]
    for text in (card.content, dataset.content):  # counts, licences and hashes only
        assert "read_csv" not in text and prepared["noise_key_id"] not in text and "None" not in text
    sheet = (tmp_path / "d.md").read_text()
    assert "None" not in sheet and "{" not in sheet.split("## 3.")[0]  # no raw JSON, no None
    assert "Opt-out rules: `opt-out` (3)" in sheet and "### Records held out (not opt-outs)" in sheet


def test_report_tables_fit_a_100_column_terminal(chain, capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import sys

    folder, ledger = chain
    monkeypatch.setenv("COLUMNS", "100")
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    capsys.readouterr()
    assert _guard("report", "--ledger", ledger) == 0
    import re

    out = re.sub(r"\x1b\[[0-9;]*m", "", capsys.readouterr().out)  # as a terminal shows it (no colour codes)
    assert max(len(line) for line in out.splitlines()) <= 100, out
    assert "runs/chain" in out and str(folder) not in out  # paths relative to the project
    assert "empty column(s) hidden" in out  # the DP columns of runs without DP


def _under_a_terminal(*args: object, columns: int = 100) -> tuple[int, str]:
    """`guard ARGS` in a subprocess whose stdout is a real pseudo-terminal `columns` wide (as a user's is): its
    exit code and the screen text (colour codes removed)."""
    import fcntl
    import os
    import re
    import struct
    import subprocess
    import sys
    import termios

    leader, follower = os.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")} | {"TERM": "xterm-256color"}
    command = [sys.executable, "-c", "from sfbd_guard.cli import main; main()", *map(str, args)]
    process = subprocess.Popen(command, stdout=follower, stderr=follower, env=env)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal closed: the process is done
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    code = process.wait(timeout=120)
    screen = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", b"".join(chunks).decode()).replace("\r\n", "\n")
    return code, screen


def _words(text: str) -> set[str]:
    return set(text.split())


def test_verify_and_report_fit_a_100_column_terminal_without_breaking_words(chain: tuple[Path, Path]) -> None:
    """Under a real terminal of 100 columns, every line fits and every word of every check's detail (and of the
    ledger tables' names) is shown whole: cells wrap between words only."""
    from rich.cells import cell_len

    from sfbd_guard.compliance.verify import verify_run

    folder, ledger = chain
    run = folder / "runs" / "chain"
    code, screen = _under_a_terminal("verify", "--run", run, "--ledger", ledger)
    assert code == 0 and max(cell_len(line) for line in screen.splitlines()) <= 100, screen
    shown = _words(screen)
    for check in verify_run(run, ledger):
        assert _words(check.detail) <= shown, (check.name, _words(check.detail) - shown)
    assert "σ̂/σ" in screen and "honest noise gives" in screen  # the noise statistics in words
    code, screen = _under_a_terminal("report", "--ledger", ledger)
    assert code == 0 and max(cell_len(line) for line in screen.splitlines()) <= 100, screen
    for word in ("fingerprint", "digits-chain", "protected", "thresholds", "holdout", "runs/chain/samples"):
        assert word in shown | _words(screen), word


def test_verify_json_names_each_check_its_status_and_evidence(chain: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    folder, ledger = chain
    run = folder / "runs" / "chain"
    capsys.readouterr()
    assert _guard("verify", "--run", run, "--ledger", ledger, "--json") == 0
    document = json.loads(capsys.readouterr().out)
    checks = {c["name"]: c for c in document["checks"]}
    assert set(checks) >= {"consumed arrays", "provenance", "noise", "noise statistics", "no protected pixels", "opt-outs",
                           "duplicates", "audit"}
    assert {c["status"] for c in checks.values()} <= {"PASS", "ATTENTION", "FAIL"}
    assert checks["no protected pixels"]["status"] == "ATTENTION" and document["attention"] == 1 and document["failed"] == 0
    assert document["passed"] + document["attention"] + document["failed"] == len(checks)
    for check in checks.values():
        assert check["evidence"] and all(Path(p).exists() for p in check["evidence"]), check
    assert str(folder / "prepared" / "manifest.parquet") in checks["opt-outs"]["evidence"]
    assert str(run / "audit" / "summary.json") in checks["audit"]["evidence"]


def test_the_html_report_links_each_check_to_its_evidence(chain: tuple[Path, Path], tmp_path: Path) -> None:
    import re
    from urllib.parse import unquote

    from sfbd_guard.compliance.verify import verify_run

    folder, ledger = chain
    page = tmp_path / "pages" / "report.html"
    assert _guard("report", "--ledger", ledger, "--html", page) == 0
    html = page.read_text()
    rows = re.findall(r"<tr><td>([^<]+)</td><td class=\"\w+check\">\w+</td>.*?<td class=\"evidence\">(.*?)</td></tr>", html, re.S)
    linked = {name: {(page.parent / unquote(h)).resolve() for h in re.findall(r'href="([^"]+)"', cell)} for name, cell in rows}
    for check in verify_run(folder / "runs" / "chain", ledger):
        assert linked[check.name] == {p.resolve() for p in check.evidence} and linked[check.name], check.name
    assert (folder / "runs" / "chain" / "audit" / "samples.parquet").resolve() in linked["audit"]


def test_guard_run_checks_the_pixel_digests_with_the_owners_digest_key(chain: tuple[Path, Path]) -> None:
    """guard run is the owner's pipeline: its report's verify compares the keyed digests (the digest key prepare kept
    in the owner's folder), so the owner's own report is not ATTENTION for want of a key the owner holds."""
    folder, _ = chain
    page = (folder / "runs" / "chain" / "report.html").read_text()
    assert "clean rows checked: none holds a protected or excluded image" in page
    assert "needs the owner&#39;s digest key" not in page and "needs the owner's digest key" not in page


def test_another_directorys_digest_key_is_named_not_read_as_tampering(chain: tuple[Path, Path], tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from sfbd_guard.keys.digests import DIGEST_HEADER, write_secret_file

    folder, ledger = chain
    other = tmp_path / "other.key"
    write_secret_file(other, f"{DIGEST_HEADER} {'ab' * 32}\n")
    assert _guard("verify", "--run", folder / "runs" / "chain", "--ledger", ledger, "--digest-key", other) == 0
    out = capsys.readouterr().out
    assert "ATTENTION  no protected pixels: the digest key given is another directory's" in out
    assert "0 failed" in out
