"""The whole sweep of bad inputs and faults (scripts/bad_input_sweep.py): zero tracebacks, the right exit
codes, one error line each, no corrupted results file. Each class of input has its own tests with
negative controls in test_records.py and test_front_door.py; this one keeps the breadth."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_sweep_finds_nothing():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "bad_input_sweep.py")], capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "0 tracebacks, 0 wrong exit codes, 0 without exactly one error line, 0 corrupted results files" in r.stdout
