"""The README's results tables are the ones generated from the committed files in benchmarks/results/."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_carries_the_generated_results_tables():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "results_table.py")],
                          capture_output=True, text=True, timeout=120, check=True)
    generated = [line for line in proc.stdout.splitlines() if line.strip()]
    assert any(line.startswith("| ") for line in generated), proc.stdout  # tables were generated
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as fh:
        readme = fh.read()
    missing = [line for line in generated if line not in readme]
    assert not missing, "README.md is out of date with benchmarks/results/; run benchmarks/results_table.py:\n" + \
        "\n".join(missing[:10])
