"""Screenshots of the compliance report and the audit page for docs/img/ (README), from headless Chromium.

    python scripts/screenshots.py [--out docs/img] [--keep DIR]

Builds the demo-like chain of the tests (tests/helpers.py `write_chain`: digits, an opt-out list, a held-out
rule, prepare → train → sample → audit) in a temporary folder, audits a sample folder with two planted copies of
protected digits (so the pages show a FAIL verdict and the rules that fired), writes `guard report --html`, and
shoots both pages with Debian's `chromium --headless --screenshot`. Not part of `make test` (CI may lack
chromium). Needs: chromium (apt-get install chromium), the dev install.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from helpers import guard, plant_samples, write_chain  # noqa: E402  (the tests' chain writer)

MAX_BYTES = 300_000


def shoot(page: Path, png: Path, *, width: int = 1280, height: int = 2000) -> Path:
    """A headless Chromium screenshot of `page`, shrunk to a palette PNG below MAX_BYTES."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise SystemExit("chromium not found: apt-get install chromium")
    raw = png.with_suffix(".raw.png")
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               f"--window-size={width},{height}", f"--screenshot={raw}", page.resolve().as_uri()]
    subprocess.run(command, check=True, capture_output=True, timeout=120)  # noqa: S603 (chromium on PATH, a page we wrote)
    from PIL import Image

    image = Image.open(raw).convert("RGB")
    for colours in (256, 128, 64):
        image.quantize(colours, method=Image.Quantize.MEDIANCUT).save(png, optimize=True)
        if png.stat().st_size < MAX_BYTES:
            break
    raw.unlink()
    return png


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    parser.add_argument("--keep", type=Path, help="build the chain in this folder and keep it (default: a temporary one)")
    args = parser.parse_args()
    work = (args.keep or Path(tempfile.mkdtemp(prefix="guard-shots-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)  # the chain's paths (policy, pipeline, opt-out list) are relative to its folder
    try:
        pipeline = write_chain(work, name="digits-demo")
        ledger = work / "ledger"
        assert guard("run", pipeline, "--ledger", ledger) == 0
        run = work / "runs" / "chain"
        plant_samples(work / "prepared", run / "planted", copies=2, novel=6)
        guard("audit", "--samples", run / "planted", "--data", work / "prepared", "--report", run / "planted-audit",
              "--config", work / "audit.yaml", "--ledger", ledger)  # exit 3: copies found, as intended
        assert guard("report", "--ledger", ledger, "--html", run / "report.html") == 0
        args.out.mkdir(parents=True, exist_ok=True)
        pages = ((run / "report.html", "compliance-report.png"), (run / "planted-audit" / "report.html", "audit-page.png"))
        for page, name in pages:
            png = shoot(page, args.out / name)
            print(f"{png} ({png.stat().st_size // 1000} KB)")
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
