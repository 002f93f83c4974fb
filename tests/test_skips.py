"""`make test` on a machine without an optional tool: the skipped groups are summed up at the end, each with the command that brings it in."""
from __future__ import annotations

import os
import subprocess
import sys

from conftest import ROOT


def test_skip_summary_names_the_missing_tool(tmp_path):
    "Without chromium (simulated by MSR_CHROMIUM pointing nowhere), the browser tests are skipped and the summary says how to get them."
    env = {**os.environ, "MSR_CHROMIUM": str(tmp_path / "no-chromium")}
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_dashboard.py"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode in (0, 5), p.stdout[-3000:] + p.stderr[-3000:]  # 5: the module skipped whole, nothing ran
    summary = p.stdout[p.stdout.index("msr: "):]
    assert "test(s) skipped, in 1 group(s)" in summary, p.stdout[-3000:]
    assert f"skipped: {tmp_path / 'no-chromium'} is not installed (apt-get install chromium; .ci/run installs it)" in summary
