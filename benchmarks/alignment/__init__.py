"""Pieces of ``benchmarks/bench_alignment.py``: the judges (ground truth the training never
sees), the prompt sets, the served service driven as a subprocess, the simulated users, the
measurements of the served model and the report.

Importing the package puts the repository root and ``benchmarks/`` on ``sys.path`` (as
``benchmarks/common.py`` does), so it works when the benchmark runs as a script.
"""

import sys
from pathlib import Path

for _path in (Path(__file__).resolve().parents[2], Path(__file__).resolve().parents[1]):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))
