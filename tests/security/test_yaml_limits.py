"""Attacks through the YAML files (policy, pipeline, audit config): size, alias expansion, encoding, nesting."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from helpers import digits_policy
from sfbd_guard.config import MAX_YAML_BYTES, read_yaml_mapping
from sfbd_guard.errors import ConfigError


def _assert_one_line(result, *fragments: str) -> None:  # type: ignore[no-untyped-def]
    assert result.code == 2, (result.out[:500], result.err[:500])
    lines = result.err.strip().splitlines()
    assert 1 <= len(lines) <= 2 and lines[0].startswith("error: "), result.err[:2000]
    assert len(result.err) < 1000, "one short line, not the expanded document"
    assert "Traceback" not in result.err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def _laughs(levels: int) -> str:
    """The 'billion laughs' document: each level is ten aliases of the one before (10**levels strings)."""
    lines = ['a0: &a0 "lol"']
    for level in range(1, levels + 1):
        lines.append(f"a{level}: &a{level} [" + ", ".join([f"*a{level - 1}"] * 10) + "]")
    return "\n".join(lines) + "\n"


def test_billion_laughs_policy_is_refused(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # Six levels (a million strings) keep the old code's failure bounded; the refusal does not depend on the depth.
    path = tmp_path / "p.yaml"
    path.write_text(_laughs(6) + "version: 1\nname: *a6\n")
    _assert_one_line(cli("prepare", "--policy", path), str(path), "alias")


def test_aliases_are_refused_wherever_they_are(tmp_path: Path) -> None:
    path = tmp_path / "x.yaml"
    path.write_text("base: &b {lr: 1}\nother: *b\n")
    with pytest.raises(ConfigError, match="alias"):
        read_yaml_mapping(path)
    path.write_text("base: &b {lr: 1}\nother:\n  <<: *b\n")
    with pytest.raises(ConfigError, match="alias"):
        read_yaml_mapping(path)


def test_oversized_policy_is_refused_before_it_is_parsed(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    policy = digits_policy(tmp_path / "out")
    policy["dataset"] = {"format": "imagefolder", "root": str(tmp_path / "missing"), "resolution": 8}
    path = tmp_path / "p.yaml"
    text = yaml.safe_dump(policy, sort_keys=False)
    path.write_text(text + "#" + "x" * (MAX_YAML_BYTES + 10) + "\n")
    _assert_one_line(cli("prepare", "--policy", path), str(path), "larger than")
    assert not (tmp_path / "out").exists()


def test_endless_stream_is_not_read(tmp_path: Path) -> None:
    """/dev/zero has no size and no end: a device (like a FIFO) is refused before a byte is read (issue 22)."""
    zero = Path("/dev/zero")
    if not zero.exists():
        pytest.skip("no /dev/zero")
    with pytest.raises(ConfigError, match="not a regular file"):
        read_yaml_mapping(zero)


def test_non_utf8_policy_is_one_line(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "p.yaml"
    path.write_bytes(b"version: 1\nname: caf\xe9\n")  # latin-1
    _assert_one_line(cli("prepare", "--policy", path), str(path), "not UTF-8")


def test_deep_nesting_is_one_line(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "p.yaml"
    path.write_text("version: 1\nname: " + "[" * 50_000 + "]" * 50_000 + "\n")
    _assert_one_line(cli("prepare", "--policy", path), str(path), "nested")


def test_pipeline_and_audit_configs_share_the_limits(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "pipe.yaml"
    path.write_text("version: 1\nname: &n tiny\nout: *n\n")
    _assert_one_line(cli("train", "--pipeline", path), str(path), "alias")
    path.write_bytes(b"version: 1\nname: \xff\n")
    _assert_one_line(cli("train", "--pipeline", path), str(path), "not UTF-8")


def test_ordinary_yaml_still_loads(tmp_path: Path) -> None:
    path = tmp_path / "x.yaml"
    path.write_text("lr: 1e-3\nrules:\n  - {name: a, where: \"x = '&b' AND y = '*c'\"}\n")
    assert read_yaml_mapping(path) == {"lr": 1e-3, "rules": [{"name": "a", "where": "x = '&b' AND y = '*c'"}]}
