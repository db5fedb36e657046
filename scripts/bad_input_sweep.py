"""Feed memprof a large set of bad inputs and faults, in one process, and count what a user would see go
wrong: tracebacks (an exception escaping `cli.main`), exit codes other than 2 for bad input, corrupted
results files. Usage: python scripts/bad_input_sweep.py [--verbose]

Each case runs `memprof.cli.main(argv)` with stdout/stderr captured, in a scratch directory. A case
passes when main returns 2 (bad input) with exactly one `memprof: error:` line, or the expected code for
the fault cases, and every results.jsonl left behind still reads.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import tempfile
import traceback

GOOD = ('{"key": "k@simulate", "spec": {"model": "test-vit", "optim": "sgd", "grad_ckpt": false, "state_bits": 32, '
        '"batch_size": 1, "budget": "titan-x", "precision": "fp32"}, "status": "ok", "source": "predicted", '
        '"metrics": {"peak_allocated_bytes": 1, "peak_reserved_bytes": 2}, "environment": {"backend": "simulate"}}')
RUN = ["run", "--models", "test-vit", "--optims", "sgd", "--backend", "simulate", "--jobs", "1", "--no-progress"]


def cases(tmp: str) -> list[tuple[str, list[str], int]]:
    def f(name: str, text: str | bytes) -> str:
        path = os.path.join(tmp, name)
        with open(path, "wb") as fh:
            fh.write(text.encode() if isinstance(text, str) else text)
        return path

    os.makedirs(os.path.join(tmp, "empty"), exist_ok=True)
    os.makedirs(os.path.join(tmp, "dir-as-results", "results.jsonl"), exist_ok=True)
    out = []
    for flag, values in {
        "--models": ["", ",", "vit-b-61", "paper,nope", "ViT-B-32x"],
        "--optims": ["", "adamww", "all,nope", "sgd-fe-nomon"],
        "--grad-ckpt": ["maybe", "", "on,yes"],
        "--state-bits": ["4", "x", "", "32,16", "-8"],
        "--batch-size": ["0", "-1", "two", "", "1.5", "1,,0"],
        "--steps": ["1", "0", "x"],
        "--budget": ["12 gigs", "titanx", "-1GiB", "0GiB", "12GiB@99.9", "12GiB@8.10", "1MiB", "nan", "device"],
        "--timeout-s": ["nan", "inf", "-1", "0", "x"],
        "--jobs": ["0", "-2", "x"],
        "--num-classes": ["1", "0", "x"],
        "--precision": ["fp16", "fp64", "", "bf16-amp,nope"],
        "--optim-impl": ["fusedd", ""],
        "--optim-in-backward": ["maybe"],
        "--resident": ["text", "clip"],
        "--out": ["", "/proc/memprof-x", os.path.join(tmp, "dir-as-results")],
        "--pretrained": ["/nonexistent.pt", f("junk.pt", b"junk")],
        "--snapshot": ["/proc/memprof-snap"],  # unwritable (simulate writes predicted snapshots)
        "--nvml-period-ms": ["5", "nan"],
        "--backend": ["quantum"],
        "--metric": ["bytes"],
        "--preset": ["paper-2021"],
    }.items():
        for v in values:
            out.append((f"run {flag} {v!r}", RUN + [f"{flag}={v}"], 2))
    out += [(f"run --retry-failed without --out", RUN + ["--retry-failed"], 2),
            ("run --resume without --out", RUN + ["--resume"], 2),
            ("fit --batch-size", ["fit", "--models", "test-vit", "--batch-size", "4"], 2),
            ("fit --max-batch-size 0", ["fit", "--models", "test-vit", "--max-batch-size", "0"], 2),
            ("advise two optims", ["advise", "--models", "test-vit", "--optims", "sgd,adamw"], 2),
            ("accuracy --lr-sgd nan", ["accuracy", "--lr-sgd", "nan", "--state-bits", "32"], 2),
            ("accuracy --train-steps 5", ["accuracy", "--train-steps", "5", "--state-bits", "32"], 2),
            ("accuracy --data missing", ["accuracy", "--data", "/nonexistent", "--state-bits", "32"], 2),
            ("unknown command", ["frobnicate"], 2), ("no command", [], 2)]
    bad_lines = ["42", '"hello"', '{"key": "x"}', "[1, 2]", '{"key": ', "\x00\x01", GOOD[:50]]
    for i, line in enumerate(bad_lines):
        path = f(f"bad{i}.jsonl", GOOD + "\n" + line + "\n")
        for cmd in (["table", path, "--out", tmp], ["compare", path, path],
                    ["baseline", "save", path, "-o", os.path.join(tmp, "b.json")], ["fidelity", path, path]):
            out.append((f"{cmd[0]} with line {line!r}", cmd, 2))
    for name, text in {"list.json": "[1]", "nobench.json": '{"kind": "memprof-baseline"}',
                       "nostats.json": '{"kind": "memprof-baseline", "benchmarks": [{"name": "x"}]}',
                       "garbage.json": "{", "pb.json": '{"benchmarks": 3, "machine_info": {}}'}.items():
        out.append((f"compare baseline {name}", ["compare", f(name, text), f("good.jsonl", GOOD + "\n")], 2))
    for target in (os.path.join(tmp, "empty"), os.path.join(tmp, "dir-as-results"), "/nonexistent"):
        out += [(f"table {target}", ["table", target], 2), (f"compare {target}", ["compare", target, target], 2)]
    out.append(("baseline save -o DIR", ["baseline", "save", f("good2.jsonl", GOOD + "\n"), "-o", tmp], 2))
    out.append(("compare nothing in common", ["compare", f("a.jsonl", GOOD + "\n"),
                                              f("b.jsonl", GOOD.replace("k@simulate", "j@simulate") + "\n")], 2))
    bad_suites = {"s1.toml": "[[run]]\noptimz = 'sgd'\n", "s2.toml": "[[run]]\nbudget = 'huge'\n",
                  "s3.toml": "not toml [", "s4.toml": "", "s5.toml": "[[run]]\nbatch_size = '0'\n",
                  "s6.toml": "[[run]]\nmodels = 3\n"}
    for name, text in bad_suites.items():
        out.append((f"suite {name}", ["suite", f(name, text), "--out", os.path.join(tmp, "suite-out")], 2))
    for cmd in (["--help"], ["run", "--help"], ["compare", "--help"], ["fit", "--help"], ["advise", "--help"]):
        out.append((" ".join(cmd), cmd, 0))
    return out


def run_case(argv: list[str]) -> tuple[int | None, str, str | None]:
    from memprof import cli

    err, outbuf = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(outbuf):
            code = cli.main(argv)
    except SystemExit as exc:  # argparse's --help exits 0 by itself
        code = exc.code
    except BaseException:  # noqa: BLE001 — exactly what the sweep counts
        return None, err.getvalue(), traceback.format_exc()
    return code, err.getvalue(), None


def main() -> int:
    verbose = "--verbose" in sys.argv
    tracebacks = wrong_code = not_one_line = corrupted = 0
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        all_cases = cases(tmp)
        for name, argv, expect in all_cases:
            code, err, tb = run_case(argv)
            problem = None
            if tb:
                tracebacks += 1
                problem = "traceback: " + tb.strip().splitlines()[-1]
            elif code != expect:
                wrong_code += 1
                problem = f"exit {code}, expected {expect}: {err.strip()[:200]}"
            elif expect == 2 and len([x for x in err.splitlines() if x.startswith("memprof: error:")]) != 1:
                not_one_line += 1
                problem = f"not one error line: {err.strip()[:200]}"
            if problem or verbose:
                print(f"{'FAIL' if problem else 'ok  '} {name}: {problem or err.strip()[:160]}")
        for root, _, files in os.walk(tmp):
            for name in files:
                if name == "results.jsonl":
                    with open(os.path.join(root, name), encoding="utf-8", errors="replace") as fh:
                        for line in fh:
                            try:
                                json.loads(line)
                            except ValueError:
                                if "bad" not in root:
                                    corrupted += 1
    print(f"{len(all_cases)} cases: {tracebacks} tracebacks, {wrong_code} wrong exit codes, {not_one_line} without "
          f"exactly one error line, {corrupted} corrupted results files")
    return 1 if tracebacks or wrong_code or not_one_line or corrupted else 0


if __name__ == "__main__":
    sys.exit(main())
