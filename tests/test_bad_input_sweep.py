"""The whole sweep of bad inputs and faults (scripts/bad_input_sweep.py): zero tracebacks, the right exit
codes, one error line each, the messages each class must (and must not) say, no corrupted results file, no
lock file left. Each class of input has its own tests with negative controls in test_records.py,
test_front_door.py and test_faults_and_bounds.py; this one keeps the breadth."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # (about 9 s: a fresh process per case)
def test_the_sweep_finds_nothing():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "bad_input_sweep.py")], capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert ("0 tracebacks, 0 wrong exit codes, 0 without exactly one error line, 0 corrupted results files, "
            "0 wrong messages, 0 lock files left") in r.stdout


def test_negative_control_the_sweep_catches_each_kind_of_failure():
    """A case that raises, exits with the wrong code, prints two error lines or misses its message is counted."""
    spec = importlib.util.spec_from_file_location("bad_input_sweep", ROOT / "scripts" / "bad_input_sweep.py")
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)

    def raises():
        raise ValueError("escaped")

    assert sweep.check(raises, 2)[0] == "traceback"
    assert sweep.check(lambda: (1, "memprof: error: x"), 2)[0] == "wrong code"
    assert sweep.check(lambda: (2, "memprof: error: x\nmemprof: error: y"), 2)[0] == "not one line"
    assert sweep.check(lambda: (2, "memprof: error: malformed"), 2, {"want": "larger than any card"})[0] == \
        "wrong message"
    assert sweep.check(lambda: (130, "continue with --resume"), 130, {"forbid": "--resume"})[0] == "wrong message"
    assert sweep.check(lambda: (2, "memprof: error: larger than any card"), 2, {"want": "larger than any card"})[0] \
        is None
