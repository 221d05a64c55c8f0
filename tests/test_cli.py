"""The `guard` CLI: help for everything, one clear line and exit 2 for every bad input, a lazy import of torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import celeba_policy, write_policy
from sfbd_guard.cli import app


def _commands():  # type: ignore[no-untyped-def]
    import typer

    group = typer.main.get_command(app)
    return group, group.commands  # type: ignore[attr-defined]


def test_every_command_and_option_has_its_own_help(cli) -> None:  # type: ignore[no-untyped-def]
    _group, commands = _commands()
    assert "prepare" in commands
    helps: dict[str, str] = {}
    for name, command in commands.items():
        assert command.help and "Example:" in command.help, f"{name} needs a help text with an example"
        result = cli(name, "--help")
        assert result.code == 0 and "Usage" in result.out
        for param in command.params:
            if param.name == "help":
                continue
            assert getattr(param, "help", None), f"{name} --{param.name} has no help"
            previous = helps.setdefault(param.help, f"{name} --{param.name}")
            assert previous == f"{name} --{param.name}" or param.name in ("ledger", "threads", "executor", "ray_address", "sign_key", "tracker"), f"help shared by {previous} and {name} --{param.name}"
    assert cli("--help").code == 0


def test_help_does_not_import_torch() -> None:
    code = "import sys; from sfbd_guard.cli import main\ntry:\n main(['--help'])\nexcept SystemExit: pass\n" \
           "heavy = [m for m in ('torch', 'open_clip', 'faiss', 'duckdb', 'pyarrow', 'jinja2', 'huggingface_hub') " \
           "if m in sys.modules]\nprint(heavy)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_guard_alone_version_short_help_and_choices(cli, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    from typing import get_args

    from sfbd_guard import __version__
    from sfbd_guard.cli import MethodChoice
    from sfbd_guard.engine.methods import Method

    alone = cli()
    assert alone.code == 0 and "Usage: guard" in alone.out and "error" not in alone.err
    assert cli("--version").out.strip() == f"sfbd_guard {__version__}"
    assert cli("report", "-h").code == 0
    assert get_args(MethodChoice) == get_args(Method)
    monkeypatch.setenv("COLUMNS", "240")  # one line per option
    for command, option, shown in (("train", "--method", "online-sfbd"), ("audit", "--embedder", "pixel|clip"),
                                   ("report", "--format", "table|csv|json|parquet"), ("sample", "--device", "cuda:N")):
        page = cli(command, "--help").out
        assert any(option in line and shown in line for line in page.splitlines()), (command, option)
    assert "list[str]" not in cli("train", "--help").out
    prepare_page = cli("prepare", "--help").out
    assert "<bool>" not in prepare_page, "flags take no value: no type shown"
    assert "'sfbd_guard[ray]'" in prepare_page, "help text is not eaten as rich markup"
    assert any("--executor" in line and "local|ray" in line for line in prepare_page.splitlines())
    bad = cli("audit", "--samples", ".", "--data", ".", "--embedder", "dino")
    assert bad.code == 2 and "'dino' is not one of" in bad.err


def test_prepare_prints_a_summary_and_exits_0(cli, tmp_path: Path, celeba_root: Path, owner_config: Path) -> None:  # type: ignore[no-untyped-def]
    path = write_policy(tmp_path / "p.yaml", celeba_policy(celeba_root, tmp_path / "ignored"))
    result = cli("prepare", "--policy", path, "--out", tmp_path / "out", "--workers", "2")
    assert result.code == 0, result.err
    assert "records per partition" in result.out and "records per rule" in result.out and "licensed" in result.out
    assert (tmp_path / "out" / "card.json").exists() and not (tmp_path / "ignored").exists()
    key = owner_config / "sfbd_guard" / "owner.key"  # XDG_CONFIG_HOME of the test (conftest.py)
    assert f"created your owner key {key} (mode 0600): this file plus any prepared directory made with it rebuilds " \
           "the protected originals" in result.out, "the owner is told on first use where the key is and what it opens"
    assert key.stat().st_mode & 0o777 == 0o600 and key.parent.stat().st_mode & 0o777 == 0o700
    again = cli("prepare", "--policy", path, "--out", tmp_path / "again")
    assert again.code == 0 and f"noise: keyed by your owner key {key}" in again.out and "created" not in again.out


def _assert_one_line_error(result, code: int, *fragments: str) -> None:  # type: ignore[no-untyped-def]
    assert result.code == code, (result.out, result.err)
    lines = result.err.strip().splitlines()
    assert 1 <= len(lines) <= 2 and lines[0].startswith("error: "), result.err
    assert len(lines) == 1 or lines[1].startswith("hint: ")
    assert "Traceback" not in result.err and "╭" not in result.err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


BAD_POLICIES = {
    "unknown key": (lambda p: p.update(nois={"sigma": 1}), "nois: unknown key"),
    "wrong type": (lambda p: p["dataset"].update(resolution="big"), "dataset.resolution"),
    "sigma zero": (lambda p: p["noise"].update(sigma=0), "noise.sigma"),
    "fraction": (lambda p: p["rules"][0]["sample"].update(fraction=2), "rules[0].sample.fraction"),
    "bad sql": (lambda p: p["rules"][0].update(where="identity = = 3"), "rules[0].where"),
    "missing dataset": (lambda p: p["dataset"].update(root="/nonexistent/celeba"), "/nonexistent/celeba"),
    "undecided": (lambda p: p["rules"].pop(), "match no rule"),
}


@pytest.mark.parametrize("case", sorted(BAD_POLICIES))
def test_bad_policies_exit_2_with_one_line(cli, tmp_path: Path, celeba_root: Path, case: str) -> None:  # type: ignore[no-untyped-def]
    change, fragment = BAD_POLICIES[case]
    policy = celeba_policy(celeba_root, tmp_path / "out")
    change(policy)
    path = write_policy(tmp_path / "p.yaml", policy)
    _assert_one_line_error(cli("prepare", "--policy", path), 2, fragment)
    assert not (tmp_path / "out").exists()


def test_missing_policy_bad_yaml_and_bad_flags_exit_2(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _assert_one_line_error(cli("prepare", "--policy", tmp_path / "none.yaml"), 2, "file not found")
    (tmp_path / "x.yaml").write_text("version: [1\n")
    _assert_one_line_error(cli("prepare", "--policy", tmp_path / "x.yaml"), 2, "not valid YAML")
    _assert_one_line_error(cli("prepare", "--policy", tmp_path / "x.yaml", "--workers", "0"), 2, "--workers")
    _assert_one_line_error(cli("prepare", "--bogus"), 2, "--bogus")
    _assert_one_line_error(cli("prepare"), 2, "--policy")
    _assert_one_line_error(cli("nosuchcommand"), 2, "nosuchcommand")


def test_existing_output_exit_2_and_strict_exit_1(cli, tmp_path: Path, celeba_root: Path) -> None:  # type: ignore[no-untyped-def]
    path = write_policy(tmp_path / "p.yaml", celeba_policy(celeba_root, tmp_path / "out"))
    assert cli("prepare", "--policy", path).code == 0
    _assert_one_line_error(cli("prepare", "--policy", path), 2, "already exists")
    broken = tmp_path / "celeba"
    broken.mkdir()
    for item in celeba_root.glob("*.txt"):  # copies: a symlink leading out of the dataset root is refused
        (broken / item.name).write_bytes(item.read_bytes())
    (broken / "img_align_celeba").mkdir()
    policy = yaml.safe_load(path.read_text())
    policy["dataset"]["root"] = str(broken)
    policy["output"] = str(tmp_path / "strict")
    strict = write_policy(tmp_path / "s.yaml", policy)
    _assert_one_line_error(cli("prepare", "--policy", strict, "--strict"), 1, "file not found")
    assert cli("prepare", "--policy", strict).code == 0  # without --strict: error rows, exit 0
