"""The benchmark commands that issues #10 and #12 name, `scripts/bench_real.py` and `scripts/bench_serve.py`, are
links to the benchmarks in `benchmarks/` and run from the repository root."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bench_real.py", "bench_serve.py"])
def test_issue_named_benchmark_runs(name):
    link = ROOT / "scripts" / name
    assert link.resolve() == (ROOT / "benchmarks" / name).resolve()
    result = subprocess.run([sys.executable, str(link), "--help"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: {name}")
