"""The chaos suites' short forms (``benches/chaos.py --quick``), one scenario per test.

Each runs real ``tei-manager serve`` processes over fake TEI instances and fails
when the scenario misses a goal; its counts are in the test's output.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "scenario", ["manager-kill", "replica-kill", "create-delete", "port-churn"]
)
def test_chaos_scenario_meets_its_goals(scenario: str, tmp_path: Path) -> None:
    report = tmp_path / "chaos.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, str(ROOT / "benches" / "chaos.py"), scenario, "--quick"]
    done = subprocess.run(
        [*command, "--json", str(report)],
        capture_output=True,
        text=True,
        env=env,
        timeout=280,
        check=False,
    )
    print(done.stdout)
    assert report.exists(), done.stderr[-3000:]
    result = json.loads(report.read_text())[scenario]
    assert result["passed"], result
    assert done.returncode == 0
