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
import functools
import json
import os
import platform
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from memprof.errors import UsageError, WriteFailed

SCHEMA_VERSION = 1
RESULTS_FILE = "results.jsonl"
LOCK_FILE = ".memprof.lock"
PREDICTED, MEASURED = "predicted", "measured"  # a record's source: the simulation's figures, or a device's
STATUSES = ("ok", "oom", "skipped", "error", "crashed", "incomplete")  # incomplete: a script that trained no step
FAILED = ("error", "crashed")  # a configuration that gave no result: the run exits 1
REQUIRED = {"key": str, "spec": dict, "status": str, "source": str, "metrics": dict, "environment": dict}


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def environment(backend: str, device: str) -> dict:
    return {
        "backend": backend,
        "device": device,
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "torch": _version("torch"),
        "open_clip_torch": _version("open_clip_torch"),
        "timm": _version("timm"),
        "memprof": _version("memprof"),
    }


def record_key(spec, backend: str, task: str = "run") -> str:
    """What identifies a record completely: the configuration, the backend that ran it, and the task when
    it is not a plain run (`#fit`: a batch-size search starting from the spec, whose batch size is 1)."""
    return f"{spec.key}@{backend}" + ("" if task == "run" else f"#{task}")


def make_record(spec, status: str, source: str, env: dict, metrics: dict | None = None,
                error: str | None = None, skip_reason: str | None = None, elapsed_s: float | None = None,
                task: str = "run") -> dict:
    assert status in STATUSES, status
    return {
        "schema_version": SCHEMA_VERSION,
        "key": record_key(spec, env["backend"], task),
        "task": task,
        "spec": spec.to_dict(),
        "status": status,
        "source": source,
        "metrics": metrics or {},
        "error": error,
        "skip_reason": skip_reason,
        "environment": env,
        "elapsed_s": None if elapsed_s is None else round(elapsed_s, 3),
    }


def write_error(path: str, exc: OSError, flag: str = "--out") -> WriteFailed:
    return WriteFailed(f"cannot write {path}: {exc.strerror or exc}; free space or choose a writable {flag} "
                       f"(everything written before is kept)")


def append(path: str, record: dict) -> None:
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


def _check(rec, where: str) -> None:
    if not isinstance(rec, dict):
        raise UsageError(f"{where}: a {type(rec).__name__}, not a record (a JSON object with "
                         f"{', '.join(REQUIRED)}); remove the line or give a memprof results file")
    for field, kind in REQUIRED.items():
        if field not in rec:
            raise UsageError(f"{where}: the record has no '{field}'; remove the line or give a memprof results file")
        if not isinstance(rec[field], kind):
            raise UsageError(f"{where}: '{field}' is a {type(rec[field]).__name__}, expected a {kind.__name__}; "
                             f"remove the line or give a memprof results file")
    if rec["status"] not in STATUSES:
        raise UsageError(f"{where}: unknown status '{rec['status']}' (known: {', '.join(STATUSES)})")
    wrong = _wrong_value(rec)
    if wrong:
        raise UsageError(f"{where}: {wrong}; restore the value memprof wrote, or remove the line (with --resume that "
                         f"configuration runs again)")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@functools.lru_cache(maxsize=1)
def _spec_types() -> dict:
    """RunSpec's field -> (types, None allowed), from its annotations (a bool is not an int here)."""
    from dataclasses import fields

    from memprof.spec import RunSpec

    kinds = {"str": (str,), "int": (int,), "bool": (bool,), "float": (int, float)}
    out = {}
    for f in fields(RunSpec):
        parts = [p.strip() for p in str(f.type).split("|")]
        out[f.name] = (tuple(t for p in parts if p != "None" for t in kinds[p]), "None" in parts)
    return out


def _bytes_value(value) -> bool:
    if isinstance(value, dict):
        return all(_bytes_value(v) for v in value.values())
    return value is None or _number(value)


def _wrong_value(rec: dict) -> str | None:
    """What a record's values say wrongly (a type no memprof writes), for the fields readers compute with:
    the spec's fields, byte counts, the files it names, the holders at the peak; None when all are right."""
    for name, value in rec["spec"].items():
        types, nullable = _spec_types().get(name, ((object,), True))
        if not (value is None and nullable) and not (isinstance(value, types) and
                                                     (bool in types or not isinstance(value, bool))):
            said = "a number" if float in types else {str: "a string", int: "a whole number",
                                                      bool: "true or false"}.get(types[0], types[0].__name__)
            return f"spec '{name}' is {json.dumps(value)[:60]}, not {said}"
    for name in ("backend", "device"):
        if name in rec["environment"] and not isinstance(rec["environment"][name], str):
            return f"environment '{name}' is {json.dumps(rec['environment'][name])}, not a string"
    for name, value in rec["metrics"].items():
        if "_bytes" in name and not _bytes_value(value):
            return f"metric '{name}' is {json.dumps(value)[:60]}, not a number of bytes"
        if name.endswith("_file") and not (value is None or isinstance(value, str)):
            return f"metric '{name}' is {json.dumps(value)}, not a file name"
        if name in ("peak_to_floor_ratio", "state_bytes_per_trainable_param", "peak_step") and not (
                value is None or _number(value)):
            return f"metric '{name}' is {json.dumps(value)[:60]}, not a number"
        if name in ("fits", "peak_op", "peak_phase") and not (value is None or isinstance(value, str)):
            return f"metric '{name}' is {json.dumps(value)[:60]}, not a string"
        if name in ("oom",) and not (value is None or isinstance(value, dict)):
            return f"metric '{name}' is {json.dumps(value)[:60]}, not an object"
        if name.startswith("top_") and not (isinstance(value, list) and all(
                isinstance(b, dict) and _number(b.get("bytes")) and isinstance(b.get("module"), str) for b in value)):
            return f"metric '{name}' is {json.dumps(value)[:60]}, not a list of {{module, bytes}}"
    return None


def read_records(path: str, name: str = "results") -> list[dict]:
    """Every record of a results.jsonl (or a run directory's), validated; later records of a key win.

    Bad input is a UsageError naming the file, the line and what is wrong."""
    file = results_path(path)
    if os.path.isdir(path) and not os.path.exists(file):
        raise UsageError(f"{path} has no {RESULTS_FILE}: give a run directory written by `memprof run --out DIR`, "
                         f"or a results.jsonl")
    if not os.path.exists(file):
        raise UsageError(f"no {name} at {path}: give a results.jsonl or a run directory")
    if os.path.isdir(file):
        raise UsageError(f"{file} is a directory, not a results file: give a results.jsonl or a run directory")
    records: dict[str, dict] = {}
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
        _check(rec, where)
        records[rec["key"]] = rec
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


def status_counts(records: list[dict]) -> dict:
    return {s: sum(1 for r in records if r["status"] == s) for s in STATUSES}


def summary_line(records: list[dict]) -> str:
    """`12 configurations: 9 ok, 1 oom, 2 skipped, 0 error, 0 crashed` (the last line of a run)."""
    counts = status_counts(records)
    if not counts["incomplete"]:
        del counts["incomplete"]  # (a grid's configurations always train: said only where a script's did not)
    return f"{len(records)} configurations: " + ", ".join(f"{n} {s}" for s, n in counts.items())


# accuracy mode's records (memprof.accuracy writes them; reports read them without importing torch)
ACCURACY_FILE = "accuracy.jsonl"


def config_of(key: str) -> str:
    """model/optim/ckpt/bits/batch/training (precision[+impl][+in-backward]): what a memory record and an
    accuracy record share."""
    return "/".join(key.split("/")[:6])


def load_verdicts(out_dir: str) -> dict:
    """config -> accuracy record, from out_dir/accuracy.jsonl if there is one."""
    import json

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
        if not isinstance(rec, dict) or not isinstance(rec.get("key"), str) or not isinstance(rec.get("verdict"), str):
            raise UsageError(f"{path}:{number}: not an accuracy record (a JSON object with a key and a verdict); "
                             f"delete that line")
        verdicts[config_of(rec["key"])] = rec
    return verdicts


def _gib(nbytes: int | None) -> str:
    from memprof.budget import format_size

    return format_size(nbytes)


@dataclass
class Result:
    """One configuration's record, as a results.jsonl line holds it (`record`), with its fields as
    attributes: status, source (predicted/measured), skip_reason, error, and every metric
    (peak_allocated_bytes, peak_reserved_bytes, peak_phase, peak_op, breakdown_at_peak_bytes, oom, fits, ...)."""

    record: dict

    def __getattr__(self, name: str) -> Any:
        record = self.__dict__.get("record", {})
        if name in record:
            return record[name]
        if name in record.get("metrics", {}):
            return record["metrics"][name]
        raise AttributeError(f"{name}: not a field of this {record.get('source', '')} result "
                             f"(fields: {', '.join(sorted(record.get('metrics', {})))})")

    @property
    def peak_bytes(self) -> int | None:
        """The peak a limit is checked against: allocated bytes (torch.cuda.max_memory_allocated, predicted
        or measured); on the cpu backend, peak live tensor bytes."""
        m = self.record["metrics"]
        return m.get("peak_allocated_bytes", m.get("peak_live_bytes"))

    @property
    def ok(self) -> bool:
        return self.record["status"] == "ok"

    @property
    def fits(self) -> bool:
        """Whether the configuration ran within the budget (status ok: no OOM, predicted or measured); False
        for an OOM, and for a result without figures (skipped, error, crashed). The record keeps the string
        ("yes", "may not fit", "no") in metrics["fits"]."""
        return self.record["status"] == "ok" and self.record["metrics"].get("fits") != "no"

    @property
    def may_not_fit(self) -> bool:
        """Whether a prediction that fits is close enough that the unmodelled allocations at their bounds
        (metrics["peak_reserved_bytes_upper"]) would pass the card."""
        return self.fits and self.record["metrics"].get("fits") == "may not fit"

    def __str__(self) -> str:
        r, m = self.record, self.record["metrics"]
        head = f"{r['source']} ({r['environment']['backend']}) {r['key']}: {r['status']}"
        if r["status"] == "skipped":
            return f"{head}: {r['skip_reason']}"
        if r["status"] in ("error", "crashed"):
            return f"{head}: {r['error']}"
        lines = [head]
        if "peak_allocated_bytes" in m:
            lines.append(f"  peak allocated {_gib(m['peak_allocated_bytes'])}, reserved "
                         f"{_gib(m.get('peak_reserved_bytes'))} on {r['spec']['budget']}"
                         + (f", fits: {'may not fit' if self.may_not_fit else 'yes' if self.fits else 'no'}"
                            if "fits" in m else ""))
        elif "peak_live_bytes" in m:
            lines.append(f"  peak live tensors {_gib(m['peak_live_bytes'])} on {r['spec']['budget']}")
        if m.get("peak_phase"):
            lines.append(f"  at the peak: {m['peak_phase']} of step {m.get('peak_step')}, op {m.get('peak_op')}")
        if m.get("breakdown_at_peak_bytes"):
            lines.append("  breakdown: " + ", ".join(f"{k} {_gib(v)}" for k, v in m["breakdown_at_peak_bytes"].items()
                                                    if v))
        if m.get("oom"):
            oom = m["oom"]
            lines.append(f"  out of memory in {oom.get('phase')} of step {oom.get('step')}"
                         + (f" at {oom['op']}" if oom.get("op") else ""))
        return "\n".join(lines)
