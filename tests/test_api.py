"""The library's face: docs/api.md's example runs as written, and the API and the CLI are one product."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def api_example() -> str:
    text = (REPO / "docs" / "api.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text.split("## Example", 1)[1], flags=re.S)
    assert len(blocks) == 1, "docs/api.md's example is one python block"
    return blocks[0]


def test_importing_the_package_loads_no_heavy_library() -> None:
    code = ("import sys, sfbd_guard; heavy = [m for m in ('torch', 'pyarrow', 'faiss', 'open_clip', 'ray', 'duckdb') "
            "if m in sys.modules]; print(heavy); assert not heavy")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_the_documented_example_runs_and_its_numbers_hold(tmp_path: Path, owner_config: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The block in docs/api.md, with its scratch folder in tmp_path; then what it printed checked against the files."""
    import sfbd_guard as guard
    from sfbd_guard.contracts.events import read_events

    code = api_example().replace('Path("guard-example")', f"Path({str(tmp_path / 'example')!r})")
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    namespace: dict[str, object] = {}
    exec(compile(code, "docs/api.md", "exec"), namespace)
    work, outcome, images, files = (namespace[k] for k in ("work", "outcome", "images", "files"))
    assert isinstance(work, Path) and work.is_relative_to(tmp_path)
    # load_run(...).sample gives the pixels guard.sample wrote as PNGs
    for index, path in enumerate(sorted(files.files)):  # type: ignore[attr-defined]
        assert np.array_equal(np.asarray(Image.open(path)), images[index, 0].numpy()), path  # type: ignore[index]
    kinds = [(e.kind, e.status) for e in read_events(work / "ledger")]
    assert kinds == [("prepare", "ok"), ("train", "ok"), ("sample", "ok"), ("audit", "ok")]
    assert all(e.command[0].startswith("sfbd_guard.") for e in read_events(work / "ledger"))
    checks = guard.verify(outcome.run_dir, ledger=work / "ledger")  # type: ignore[attr-defined]
    assert not [c.name for c in checks if not c.passed]


def test_a_failed_call_leaves_a_failed_event(tmp_path: Path) -> None:
    import sfbd_guard as guard
    from sfbd_guard.contracts.events import read_events
    from sfbd_guard.errors import InputError

    with pytest.raises(InputError, match="either --pipeline"):
        guard.train(ledger=tmp_path / "ledger")
    (event,) = read_events(tmp_path / "ledger")
    assert (event.kind, event.status, event.command) == ("train", "failed", ["sfbd_guard.train()"])


def test_no_submodule_shadows_a_function_of_the_face() -> None:
    """Importing a submodule sets it as an attribute of its package: a module named like a function of the face
    (sfbd_guard.audit, sfbd_guard.run) would replace that function once anything imported it."""
    import importlib
    import pkgutil

    import sfbd_guard

    names = {m.name for m in pkgutil.iter_modules(sfbd_guard.__path__)}
    assert not names & set(sfbd_guard.__all__), "a submodule has the name of a function of the face"
    for module in ("sfbd_guard.auditing.service", "sfbd_guard.stages", "sfbd_guard.engine.service"):
        importlib.import_module(module)
    assert all(callable(getattr(sfbd_guard, name)) for name in sfbd_guard.__all__ if name != "__version__")
