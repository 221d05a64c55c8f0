"""The README's quickstart, as written: its `guard` commands run on a small folder of images and exit 0.

The commands are read from the README's "Quickstart: your own folder of images" code block, so the
README cannot drift from what works. They run through the real CLI entry point in a scratch copy of
the shipped policy, pipeline and audit config (the same relative layout as the repository), with the
user's folder replaced by a synthetic one and a tiny training budget added to `guard train`.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest

from fixtures.synthetic import write_imagefolder

REPO = Path(__file__).resolve().parents[1]
HEADING = "## Quickstart: your own folder of images"
USER_FOLDER = "~/my-images"
# A budget that runs in seconds: 4 clean steps and one SFBD round of 2 steps, on a tiny U-Net.
TINY_TRAINING = ["--device", "cpu", "--set", "batch=16", "--set", "schedule.pretrain_kimg=0.064",
                 "--set", "schedule.pretrain_until=kimg", "--set", "schedule.total_kimg=0.096",
                 "--set", "schedule.rounds=1", "--set", "schedule.round_kimg=0.032",
                 "--set", "model.model_channels=8", "--set", "model.num_blocks=1",
                 "--set", "denoise.steps=2", "--set", "grid_size=4", "--set", "optimizer.warmup_kimg=0.01"]
TINY_SAMPLING = {"--n": "8", "--steps": "4"}


def quickstart_commands() -> list[list[str]]:
    """The `guard ...` lines of the first bash block under the quickstart heading, split like a shell."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert HEADING in readme, f"README.md has no '{HEADING}' section"
    section = readme.split(HEADING, 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block is not None, "the quickstart has no bash block"
    return [shlex.split(line, comments=True) for line in block.group(1).splitlines() if line.startswith("guard ")]


def _tiny(command: list[str], images: Path) -> list[str]:
    args = [str(images) if word == USER_FOLDER else word for word in command[1:]]
    if args[0] == "train":
        args += TINY_TRAINING
    if args[0] == "sample":
        for flag, value in TINY_SAMPLING.items():
            if flag in args:
                args[args.index(flag) + 1] = value
            else:
                args += [flag, value]
    return args


def test_the_quickstart_covers_the_whole_chain() -> None:
    commands = quickstart_commands()
    steps = [c[1] for c in commands]
    assert steps[:4] == ["prepare", "train", "sample", "audit"], steps
    assert {"report", "verify"} <= set(steps[4:]), steps
    assert commands[0][2:4] == ["--policy", "policies/imagefolder.yaml"]
    assert commands[1][2:4] == ["--pipeline", "pipelines/imagefolder.yaml"]
    assert USER_FOLDER in commands[0], "the quickstart prepares the user's own folder"


def test_the_readme_quickstart_runs_on_a_folder_of_images(cli, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "work"
    for name in ("policies/imagefolder.yaml", "pipelines/imagefolder.yaml", "audits/default.yaml"):
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(REPO / name, work / name)
    rows = [{"file_name": f"photos/{i:03d}.png" if i % 2 else f"{i:03d}.jpg",
             "license": "CC0-1.0" if i % 4 == 0 else ("CC-BY-4.0" if i % 7 == 0 else "proprietary"),
             "opt_out": "true" if i % 10 == 9 else ""} for i in range(40)]
    images = write_imagefolder(tmp_path / "my-images", rows, extra_images=["unlisted.png"])
    monkeypatch.chdir(work)
    for command in quickstart_commands():
        result = cli(*_tiny(command, images))
        assert result.code == 0, f"{shlex.join(command)} exited {result.code}:\n{result.out}\n{result.err}"
    assert (work / "prepared/imagefolder-32/card.json").is_file()
    audit = next(c for c in quickstart_commands() if c[1] == "audit")
    summary = json.loads((work / audit[audit.index("--out") + 1] / "summary.json").read_text())
    assert summary["thresholds"]["method"] == "holdout", "the quickstart's audit is calibrated on its held-out images"
    assert "95% confidence" in summary["thresholds"]["expected_fpr_text"]
    assert command[1] == "verify" and " 0 failed" in result.out, result.out


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#{1,6} +(.+?) *$", re.sub(r"```.*?```", "", markdown, flags=re.S), re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("page", ["README.md", "benchmarks/README.md", *sorted(
    str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md"))])
def test_relative_links_lead_to_files_and_headings(page: str) -> None:
    path = REPO / page
    text = path.read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)\s]+)\)", re.sub(r"```.*?```", "", text, flags=re.S)):
        if re.match(r"[a-z]+://", target):
            continue
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        assert linked.exists(), f"{page}: link {target}: no such file"
        if anchor:
            assert anchor in _anchors(linked.read_text(encoding="utf-8")), f"{page}: link {target}: no such heading"
