"""The record of one configuration, typed: checked once, where it is made or read, then read by field.

A record is one JSON object in a results.jsonl (memprof.results reads and writes the files), kept byte for byte as
memprof has always written it, fields this version does not know included. `Result` is the record as the Python
API returns it (memprof.predict, memprof.measure, ...).
"""

from __future__ import annotations

import functools
import json
import platform
import re
from importlib import metadata
from typing import Any

from memprof.budget import format_size
from memprof.errors import UsageError
from memprof.spec import RunSpec
from memprof.vocabulary import Source, Status

SCHEMA_VERSION = 1
REQUIRED = {"key": str, "spec": dict, "status": str, "source": str, "metrics": dict, "environment": dict}
FIX = "remove the line or give a memprof results file"


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def environment(backend: str, device: str) -> dict:
    """Where a record's figures were made: the backend, the device and the versions that made them."""
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


class Record(dict):
    """One configuration's record: the JSON object a results.jsonl line holds (a dict, so it is written, copied and
    compared as one), checked once when it is made or read, and read by typed field: `spec` (RunSpec), `status`
    (Status), `source` (Source), `metrics`, `environment`, `task`, `error`, `skip_reason`, `elapsed_s`, and what
    derives from them (`config`, `backend`, `device`, `peak_bytes`). `Record.parse(obj)` checks a JSON object (a
    UsageError names what is wrong and where), `Record.make(...)` makes a new one."""

    __slots__ = ()

    @classmethod
    def make(cls, spec: RunSpec, status: str, source: str, env: dict, metrics: dict | None = None,
             error: str | None = None, skip_reason: str | None = None, elapsed_s: float | None = None,
             task: str = "run") -> "Record":
        """A new record of `spec` (the JSON object memprof has always written: same fields, same values). What a
        backend measured is taken as it is; `parse` checks what a file says."""
        return cls({
            "schema_version": SCHEMA_VERSION,
            "key": record_key(spec, env["backend"], task),
            "task": task,
            "spec": spec.to_dict(),
            "status": Status(status).value,
            "source": Source(source).value,
            "metrics": metrics or {},
            "error": error,
            "skip_reason": skip_reason,
            "environment": env,
            "elapsed_s": None if elapsed_s is None else round(elapsed_s, 3),
        })

    @classmethod
    def parse(cls, obj, where: str = "a record") -> "Record":
        """A record from its JSON object, every field a reader computes with checked (a UsageError saying what is
        wrong at `where`, e.g. `results.jsonl:3`, and the fix)."""
        _check(obj, where)
        return obj if isinstance(obj, Record) else cls(obj)

    @classmethod
    def of(cls, record) -> "Record":
        """A Record as it is, or a Result's record or a JSON object checked (reports take any of them)."""
        if isinstance(record, Record):
            return record
        if isinstance(record, Result):
            return record.parsed
        return cls.parse(record)

    key = property(lambda self: self["key"], doc="the spec's key and the backend (`...@simulate`, `#fit` for a search)")
    spec = property(lambda self: RunSpec.from_dict(self["spec"]), doc="what was run (memprof.spec.RunSpec)")
    status = property(lambda self: Status(self["status"]))
    source = property(lambda self: Source(self["source"]), doc="predicted or measured")
    metrics = property(lambda self: self["metrics"], doc="the figures, by names memprof.metrics declares")
    environment = property(lambda self: self["environment"], doc="backend, device, versions")
    task = property(lambda self: self.get("task") or "run", doc="run, or fit (a batch-size search)")
    error = property(lambda self: self.get("error"))
    skip_reason = property(lambda self: self.get("skip_reason"))
    elapsed_s = property(lambda self: self.get("elapsed_s"))

    @property
    def config(self) -> str:
        """The configuration, whatever the card and the steps (memprof.spec.RunSpec.config): what reports pair
        and label records by."""
        return self.spec.config

    @property
    def backend(self) -> str:
        return self["environment"].get("backend", "")

    @property
    def device(self) -> str | None:
        return self["environment"].get("device")

    @property
    def peak_bytes(self) -> int | None:
        """The peak a limit is checked against: allocated bytes (torch.cuda.max_memory_allocated, predicted or
        measured); on the cpu backend, peak live tensor bytes."""
        return self["metrics"].get("peak_allocated_bytes", self["metrics"].get("peak_live_bytes"))


def as_records(records) -> list[Record]:
    """Records, Results or JSON objects, as Records (a report's input)."""
    return [Record.of(r) for r in records]


# --- checks: what a record's values may be ---------------------------------------------------------------------

def _check(rec, where: str) -> None:
    if not isinstance(rec, dict):
        raise UsageError(f"{where}: a {type(rec).__name__}, not a record (a JSON object with "
                         f"{', '.join(REQUIRED)}); {FIX}")
    for name, kind in REQUIRED.items():
        if name not in rec:
            raise UsageError(f"{where}: the record has no '{name}'; {FIX}")
        if not isinstance(rec[name], kind):
            raise UsageError(f"{where}: '{name}' is a {type(rec[name]).__name__}, expected a {kind.__name__}; {FIX}")
    if rec["status"] not in Status.__members__.values():
        raise UsageError(f"{where}: unknown status '{rec['status']}' (known: {', '.join(Status)})")
    if rec["source"] not in Source.__members__.values():
        raise UsageError(f"{where}: unknown source '{rec['source']}' (known: {', '.join(Source)}); {FIX}")
    for name in ("model", "optim"):
        if name not in rec["spec"]:
            raise UsageError(f"{where}: the record's spec has no '{name}'; {FIX}")
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
    if not isinstance(rec.get("task", "run"), str):
        return f"'task' is {json.dumps(rec['task'])[:60]}, not a string"
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


# --- the record as the Python API returns it --------------------------------------------------------------------

WIDTH = 100  # print(result) fits a terminal this wide


def _wrapped(text: str, width: int = WIDTH, indent: str = "    ") -> list[str]:
    """`text` on lines of at most `width` columns, broken after a space (not between a size and its unit) or a
    '/' (a record key breaks between its segments), continuation lines indented; a run with no break longer than a
    line is cut."""
    lines, line = [], ""
    for token in re.split(r"(?<=/)|(?<= )(?!(?:[KMGT]i)?B\b)", text):
        if line.strip() and len(line) + len(token.rstrip()) > width:
            lines.append(line.rstrip())
            line = indent
        line += token
        while len(line) > width:
            lines.append(line[:width])
            line = indent + line[width:]
    return lines + [line.rstrip()] if line.strip() else lines


class Result:
    """One configuration's record as the Python API returns it: `record` is the JSON object a results.jsonl line
    holds, `parsed` the Record; its fields read as attributes: status (Status), source (Source), spec (RunSpec,
    also indexable: `spec["grad_ckpt"]`), key, skip_reason, error, environment, and every metric
    (peak_allocated_bytes, peak_reserved_bytes, peak_phase, peak_op, breakdown_at_peak_bytes, oom, fits, ...).
    `print(result)` says it in lines of at most 100 columns."""

    def __init__(self, record: Record | dict):
        self.__dict__["record"] = record

    @property
    def parsed(self) -> Record:
        """The record as a Record (checked, where the API was handed a plain dict)."""
        return Record.of(self.record)

    def __getattr__(self, name: str) -> Any:
        record = self.__dict__.get("record", {})
        if name in ("status", "source", "spec") and name in record:  # typed, as Record reads them
            return getattr(Record, name).fget(record)
        if name in record:
            return record[name]
        if name in record.get("metrics", {}):
            return record["metrics"][name]
        raise AttributeError(f"{name}: not a field of this {record.get('source', '')} result "
                             f"(fields: {', '.join(sorted(record.get('metrics', {})))})")

    def __eq__(self, other) -> bool:
        return isinstance(other, Result) and other.record == self.record

    def __repr__(self) -> str:
        return f"Result({self.record.get('key')!r}, status={self.record.get('status')!r})"

    peak_bytes = property(lambda self: Record.peak_bytes.fget(self.record), doc="as Record.peak_bytes")

    @property
    def ok(self) -> bool:
        return self.record["status"] == Status.OK

    @property
    def fits(self) -> bool:
        """Whether the configuration ran within the budget (status ok: no OOM, predicted or measured); False
        for an OOM, and for a result without figures (skipped, error, crashed). The record keeps the string
        ("yes", "may not fit", "no") in metrics["fits"]."""
        return self.record["status"] == Status.OK and self.record["metrics"].get("fits") != "no"

    @property
    def may_not_fit(self) -> bool:
        """Whether a prediction that fits is close enough that the unmodelled allocations at their bounds
        (metrics["peak_reserved_bytes_upper"]) would pass the card."""
        return self.fits and self.record["metrics"].get("fits") == "may not fit"

    def lines(self) -> list[str]:
        """What print(result) shows, one item per line before wrapping: the head (source, backend, status, key),
        then the peaks and the verdict, where the peak falls, the breakdown there and any out-of-memory."""
        r, m = self.record, self.record["metrics"]
        head = f"{r['source']} ({r['environment']['backend']}) {r['key']}: {r['status']}"
        if r["status"] == Status.SKIPPED:
            return [f"{head}: {r['skip_reason']}"]
        if r["status"] in (Status.ERROR, Status.CRASHED):
            return [f"{head}: {r['error']}"]
        lines = [head]
        if "peak_allocated_bytes" in m:
            lines.append(f"  peak allocated {format_size(m['peak_allocated_bytes'])}, reserved "
                         f"{format_size(m.get('peak_reserved_bytes'))} on {r['spec']['budget']}"
                         + (f", fits: {'may not fit' if self.may_not_fit else 'yes' if self.fits else 'no'}"
                            if "fits" in m else ""))
        elif "peak_live_bytes" in m:
            lines.append(f"  peak live tensors {format_size(m['peak_live_bytes'])} on {r['spec']['budget']}")
        if m.get("peak_phase"):
            lines.append(f"  at the peak: {m['peak_phase']} of step {m.get('peak_step')}, op {m.get('peak_op')}")
        if m.get("breakdown_at_peak_bytes"):
            lines.append("  breakdown: " + ", ".join(f"{k} {format_size(v)}"
                                                    for k, v in m["breakdown_at_peak_bytes"].items() if v))
        if m.get("oom"):
            oom = m["oom"]
            lines.append(f"  out of memory in {oom.get('phase')} of step {oom.get('step')}"
                         + (f" at {oom['op']}" if oom.get("op") else ""))
        return lines

    def __str__(self) -> str:
        return "\n".join(wrapped for line in self.lines() for wrapped in _wrapped(line))
