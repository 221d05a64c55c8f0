"""Shared fixtures: small datasets in the real on-disk layouts, policy files, and a CLI runner."""

from __future__ import annotations

import os

# The tests' models are tiny: one thread per process is faster than two, and keeps the tests that start
# two processes (DDP, gloo) from oversubscribing the two cores, where OpenMP's spin-waiting makes every
# small operation hundreds of times slower. Set before torch is imported, so subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fixtures.synthetic import write_celeba, write_cifar10
from sfbd_guard.cli import main


def _owner_config(folder: Path, monkeypatch: pytest.MonkeyPatch, lineage: Path) -> None:
    """The owner's key and release register (created by the first prepare) go under `folder`, never the real
    home: XDG_CONFIG_HOME is set and GUARD_KEY_FILE unset. HOME stays, so cached model weights are still found.
    The lineage folder (full manifests by fingerprint, read by the audit) and the digest keys are one for the
    session, linked into every owner folder: a module's fixture prepares under the module's owner folder, its tests audit under theirs."""
    (folder / "sfbd_guard").mkdir(mode=0o700, parents=True, exist_ok=True)
    for name in ("lineage", "digest-keys"):  # digest-keys: the digest keys prepare keeps for the owner's guard run
        link = folder / "sfbd_guard" / name
        if not link.exists():
            (lineage.parent / f"{lineage.name}-{name}").mkdir(mode=0o700, exist_ok=True)
            link.symlink_to(lineage.parent / f"{lineage.name}-{name}", target_is_directory=True)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(folder))
    monkeypatch.delenv("GUARD_KEY_FILE", raising=False)


@pytest.fixture(autouse=True, scope="session")
def _session_lineage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("lineage")


@pytest.fixture(autouse=True, scope="session")
def _session_owner_config(tmp_path_factory: pytest.TempPathFactory, _session_lineage: Path) -> Iterator[None]:
    """For session-scoped fixtures that prepare (instantiated before any module or test fixture)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        _owner_config(tmp_path_factory.mktemp("config-session"), monkeypatch, _session_lineage)
        yield


@pytest.fixture(autouse=True, scope="module")
def _module_owner_config(tmp_path_factory: pytest.TempPathFactory, _session_lineage: Path) -> Iterator[None]:
    """Each module's fixtures get an owner key and register of their own (two modules preparing the digits with
    other keys are not one owner re-releasing them)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        _owner_config(tmp_path_factory.mktemp("config-module"), monkeypatch, _session_lineage)
        yield


@pytest.fixture(autouse=True)
def owner_config(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch,
                 _session_lineage: Path) -> Path:
    """Each test its own owner key and release register, outside its tmp_path (a test may prepare into tmp_path
    itself, which must not hold the owner's key): the test's XDG_CONFIG_HOME."""
    folder = tmp_path_factory.mktemp("config")
    _owner_config(folder, monkeypatch, _session_lineage)
    return folder


@pytest.fixture(autouse=True)
def _isolated_ledger(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test writes its ledger events under its own temporary directory."""
    ledger = tmp_path / "ledger"
    monkeypatch.setenv("GUARD_LEDGER", str(ledger))
    return ledger


@pytest.fixture(scope="session")
def celeba_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_celeba(tmp_path_factory.mktemp("celeba"), 40, identities=10)


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_cifar10(tmp_path_factory.mktemp("cifar"), 6)


@dataclass
class CliResult:
    code: int
    out: str
    err: str


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., CliResult]:
    """Run `guard ARGS...` in-process through the real entry point and capture its output."""

    def run(*args: str) -> CliResult:
        capsys.readouterr()
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exit_:
            code = int(exit_.code or 0)
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run
