"""Quality on scikit-learn's digits: `quality.py --set digits` (kept for the commands in benchmarks/README.md).

    python benchmarks/quality_digits.py --out bench-quality [--budget-kimg 100] [--json results.json]
"""

from __future__ import annotations

import quality

if __name__ == "__main__":
    quality.main(default_set="digits")
