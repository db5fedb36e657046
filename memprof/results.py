"""Result records: one JSON object per configuration, appended to a JSONL file as each one finishes.

A record holds the spec (what was run), the status, where its figures come from (`source`:
"predicted" or "measured"), the metrics with units in their field names, and the environment. Its key
is the spec's key plus the backend (`...@simulate`), so a suite that predicts and measures the same
configuration keeps both.

This module is the one reader (`read_records`: every line validated, errors name file, line and fix)
and the one writer (`ResultsFile`: a locked run directory, appends that are flushed and fsynced, a
torn last line repaired first) of results.
"""

from __future__ import annotations

import fcntl
import json
import os
import platform

from memprof.errors import UsageError, WriteFailed
from memprof.records import Record, Result, environment  # noqa: F401 (Result, environment: memprof.script's imports)
from memprof.vocabulary import Status

RESULTS_FILE = "results.jsonl"
LOCK_FILE = ".memprof.lock"


def make_record(spec, status: str, source: str, env: dict, metrics: dict | None = None,
                error: str | None = None, skip_reason: str | None = None, elapsed_s: float | None = None,
                task: str = "run") -> dict:
    """A new record's JSON object (memprof.records.Record.make, as written)."""
    return dict(Record.make(spec, status, source, env, metrics, error, skip_reason, elapsed_s, task))


def write_error(path: str, exc: OSError, flag: str = "--out") -> WriteFailed:
    return WriteFailed(f"cannot write {path}: {exc.strerror or exc}; free space or choose a writable {flag} "
                       f"(everything written before is kept)")


def append(path: str, record: Record | dict) -> None:
    """Append one record and flush it to disk, so a crash or Ctrl-C loses nothing already finished.

    A file whose last line lacks its newline (a run killed mid-write, an editor) gets one first, so the
    new record never joins it. A failing write is a UsageError naming the path and the OS error."""
    line = json.dumps(record, sort_keys=True) + "\n"
    try:
        with open(path, "a+b") as fh:
            if fh.tell() > 0:
                fh.seek(-1, os.SEEK_END)
                if fh.read(1) != b"\n":
                    line = "\n" + line
            fh.write(line.encode("utf-8"))
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        raise write_error(path, exc) from None


def write_text(path: str, text: str, flag: str = "--out") -> None:
    """Write a report file; a failure is one line naming the path and the option choosing it (`flag`), not a
    traceback."""
    try:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text)
    except OSError as exc:
        raise write_error(path, exc, flag) from None


def results_path(path: str) -> str:
    """A run directory's results.jsonl, or the file itself."""
    return os.path.join(path, RESULTS_FILE) if os.path.isdir(path) else path


def read_records(path: str, name: str = "results") -> list[Record]:
    """Every record of a results.jsonl (or a run directory's), parsed (memprof.records.Record); later records of a
    key win.

    Bad input is a UsageError naming the file, the line and what is wrong."""
    file = results_path(path)
    if os.path.isdir(path) and not os.path.exists(file):
        raise UsageError(f"{path} has no {RESULTS_FILE}: give a run directory written by `memprof run --out DIR`, "
                         f"or a results.jsonl")
    if not os.path.exists(file):
        raise UsageError(f"no {name} at {path}: give a results.jsonl or a run directory")
    if os.path.isdir(file):
        raise UsageError(f"{file} is a directory, not a results file: give a results.jsonl or a run directory")
    records: dict[str, Record] = {}
    try:
        with open(file, encoding="utf-8") as fh:
            lines = fh.read().split("\n")
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise UsageError(f"{file}: {why}; give a results.jsonl written by memprof") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{file}:{number}"
        try:
            rec = json.loads(line)
        except ValueError as exc:
            # torn: the last line, without its newline, after lines that were records: a run stopped writing it
            torn = number == len(lines) and bool(records)
            raise UsageError(f"{where}: not JSON ({exc.msg})" + (
                "; the last line is incomplete (a run stopped while writing it): delete that line, then --resume"
                if torn else "; remove the line or give a memprof results file" if records else
                "; this is not a memprof results file: give a results.jsonl or a run directory")) from None
        record = Record.parse(rec, where)
        records[record.key] = record
    if not records:
        raise UsageError(f"{file} holds no records: run `memprof run` first")
    return list(records.values())


class RunDirectory:
    """An output directory held by one run: an exclusive lock (fcntl) on its lock file, which names the
    holder, for as long as the run writes there. A second run on the same directory is refused at once."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.results = os.path.join(out_dir, RESULTS_FILE)
        self._fh = None

    def __enter__(self) -> "RunDirectory":
        lock = os.path.join(self.out_dir, LOCK_FILE)
        while True:
            try:
                fh = open(lock, "a+", encoding="utf-8")
            except OSError as exc:
                raise write_error(lock, exc) from None
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.seek(0)
                holder = fh.read().strip() or "another process"
                fh.close()
                raise UsageError(f"--out {self.out_dir} is in use by another memprof run ({holder}): wait for it to "
                                 f"finish, or choose another --out") from None
            try:  # the holder before us removes the file as it lets go: a lock on that removed file holds nothing
                if os.stat(lock).st_ino == os.fstat(fh.fileno()).st_ino:
                    break
            except FileNotFoundError:
                pass
            fh.close()
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {platform.node()}")
        fh.flush()
        self._fh = fh
        return self

    def __exit__(self, *exc) -> None:
        """Remove the lock file while still holding it (a run leaves nothing behind), then let go."""
        try:
            os.remove(os.path.join(self.out_dir, LOCK_FILE))
        except OSError:
            pass
        fcntl.flock(self._fh, fcntl.LOCK_UN)
        self._fh.close()


def summary_line(records: list[dict]) -> str:
    """`12 configurations: 9 ok, 1 oom, 2 skipped, 0 error, 0 crashed` (the last line of a run)."""
    counts = {s.value: sum(1 for r in records if r["status"] == s) for s in Status}
    if not counts["incomplete"]:
        del counts["incomplete"]  # (a grid's configurations always train: said only where a script's did not)
    return f"{len(records)} configurations: " + ", ".join(f"{n} {s}" for s, n in counts.items())


# accuracy mode's records (memprof.accuracy writes them; reports read them without importing torch)
ACCURACY_FILE = "accuracy.jsonl"


def load_verdicts(out_dir: str) -> dict:
    """config (memprof.spec.RunSpec.config) -> accuracy record, from out_dir/accuracy.jsonl if there is one."""
    from memprof.spec import RunSpec

    path = os.path.join(out_dir, ACCURACY_FILE) if os.path.isdir(out_dir) else os.path.join(
        os.path.dirname(out_dir) or ".", ACCURACY_FILE)
    if not os.path.exists(path):
        return {}
    verdicts = {}
    try:
        with open(path, encoding="utf-8") as fh:
            lines = fh.read().split("\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: {getattr(exc, 'strerror', None) or 'not UTF-8 text'}; give an accuracy.jsonl "
                         f"written by `memprof accuracy`") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as exc:
            raise UsageError(f"{path}:{number}: not JSON ({exc.msg}); delete that line (accuracy mode reruns it)"
                             ) from None
        if not isinstance(rec, dict) or not isinstance(rec.get("key"), str) or not isinstance(rec.get("verdict"), str) \
                or not isinstance(rec.get("spec"), dict) or not isinstance(rec["spec"].get("model"), str):
            raise UsageError(f"{path}:{number}: not an accuracy record (a JSON object with a key, a spec and a "
                             f"verdict); delete that line")
        try:
            config = RunSpec.from_dict(rec["spec"]).config
        except TypeError:
            raise UsageError(f"{path}:{number}: the accuracy record's spec is not one memprof wrote; delete that line "
                             f"(accuracy mode reruns it)") from None
        verdicts[config] = rec
    return verdicts
