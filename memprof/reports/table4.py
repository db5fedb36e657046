"""Table 4 from result records: markdown, CSV, JSON and a stacked bar chart, with the paper's claims beside.

Renderers only read records. Rows are optimizers, columns models; a cell is the peak in GiB of the
chosen metric and how much more AdamW needs than that row (the paper's "AdamW uses X% more memory").
Each table is for one setting of (grad_ckpt, state_bits, batch_size, budget) and says where its figures
come from.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections import OrderedDict

from tabulate import tabulate

from memprof.budget import CONTEXT_ESTIMATE_BYTES, card_label, format_size as _size, gib_figure as gib
from memprof.model_sources.open_clip import PAPER_MODELS, REGISTRY as MODELS
from memprof.records import Record, as_records
from memprof.reports.overhead import render_overhead
from memprof.reports.paper import CLAIM_TOLERANCE_POINTS, PAPER_CLAIMS
from memprof.reports.terminal import fit_table
from memprof.optims import REGISTRY as OPTIMS
from memprof.spec import RunSpec
from memprof.vocabulary import Source, Status

GIB = 1 << 30
METRICS = {
    "reserved": ("peak_reserved_bytes", "peak reserved (torch.cuda.max_memory_reserved)"),
    "allocated": ("peak_allocated_bytes", "peak allocated (torch.cuda.max_memory_allocated)"),
    "nvml-process": ("nvml_process_peak_bytes", "peak NVML process memory (measured: sampled by PID; predicted: "
                                                "peak reserved + estimated CUDA context)"),
    "live": ("peak_live_bytes", "peak live tensor bytes (no allocator rounding)"),
}

def default_metric(records: list[dict]) -> str:
    """reserved where any record has it (cuda, simulate), else live tensor bytes (the cpu backend)."""
    return "reserved" if any("peak_reserved_bytes" in r["metrics"] for r in records) else "live"


def _training(spec: RunSpec) -> tuple:
    """How a record trains: precision, optimizer implementation, optimizer-in-backward, what is resident on
    the device, when gradients are cleared (older records: the defaults)."""
    return (spec.precision, spec.optim_impl, spec.optim_in_backward, spec.resident, spec.clear_grads, spec.grad_accum,
            spec.train)


def _training_label(training: tuple) -> str:
    precision, impl, in_backward, resident, clear, accum, train = training
    return ", ".join([precision] + ([f"{impl} optimizer"] if impl != "foreach" else [])
                     + (["optimizer in backward"] if in_backward else [])
                     + (["whole CLIP model resident"] if resident == "clip" else [])
                     + ([f"gradients cleared {clear.replace('-', ' ')}"] if clear != "after-step" else [])
                     + ([f"{accum}x gradient accumulation"] if accum != 1 else [])
                     + ([f"training {train}"] if train != "all" else []))


def _setting(rec: Record) -> tuple:
    """Records in one table share these (a section per precision and optimizer implementation); a table never
    mixes predicted and measured figures."""
    s = rec.spec
    return (s.grad_ckpt, s.batch_size, s.budget, _training(s), rec.source.value, rec.device or "unknown device",
            s.parallelism)


def run_records(records: list) -> list[Record]:
    """The records Table 4 is made of (memprof.records.Record; JSON objects are parsed): runs, not `memprof fit`
    searches (a fit record's spec says batch 1, its figures are at the largest batch that fits; fit.md reports
    it)."""
    return [r for r in as_records(records) if r.task != "fit"]


def paper_settings(records: list[Record]) -> set:
    """The settings (see _setting) on the paper's grid: every model one of the paper's, every optimizer one
    of the paper's, micro-batch 1. Only these get the paper's framing (how much more AdamW needs, the
    paper's claims and verdicts, the overhead its percentages imply); any other grid is a plain table of
    its own axes."""
    from memprof.optims import PAPER_OPTIMS

    groups: dict = {}
    for r in records:
        groups.setdefault(_setting(r), []).append(r)
    return {setting for setting, recs in groups.items()
            if setting[1] == 1 and all(r.spec.model in PAPER_MODELS and r.spec.optim in PAPER_OPTIMS for r in recs)}


def _setting_title(setting: tuple, paper: bool = True) -> str:
    ckpt, bs, budget, training, source, device, parallelism = setting
    return (f"{'micro-batch' if paper else 'batch size'} {bs}, {_training_label(training)}, gradient checkpointing {'on' if ckpt else 'off'}, "
            f"budget {budget}" + ("" if parallelism == "none" else f", rank 0 of {parallelism}") +
            f": {source} ({device})")


def _method(rec: Record) -> tuple:
    """A table row: the optimizer, how its states are kept (32-bit, 8-bit, 8-bit paged) and peft's adapters
    (`off`, `lora8`: RunSpec.adapters), so a LoRA row sits beside the paper's methods in the same setting."""
    return rec.spec.optim, rec.spec.state_bits, rec.spec.paged, rec.spec.adapters


def _method_label(method: tuple) -> str:
    optim, bits, paged, adapters = (*method, "off")[:4]
    label = OPTIMS[optim].label if optim in OPTIMS else optim
    label = label if bits == 32 else f"{label}, 8-bit states" + (" (paged)" if paged else "")
    return label if adapters == "off" else f"{label} + {_adapters_label(adapters)}"


def _adapters_label(adapters: str) -> str:
    """`lora8` -> `LoRA r=8`, `dora16-a32` -> `DoRA r=16 alpha=32`."""
    import re

    head, *rest = adapters.split("-")
    m = re.fullmatch(r"([a-z]+)(\d+)", head)
    if m is None:
        return adapters
    words = [{"lora": "LoRA", "dora": "DoRA"}.get(m[1], m[1]), f"r={m[2]}"]
    names = {"a": "alpha", "d": "dropout", "t": "targets"}
    words += [f"{names[p[0]]}={p[1:]}" for p in rest if p[:1] in names]
    return " ".join(words)


def _ordered(names, registry):
    known = [n for n in registry if n in names]
    return known + sorted(n for n in names if n not in registry)


def _rank(name: str, registry: dict) -> int:
    """A name's place in its registry (models, optimizers), 99 for one it does not hold."""
    return list(registry).index(name) if name in registry else 99


def _source(records: list[dict]) -> str:
    sources = sorted({r["source"] for r in records})
    devices = sorted({str(r["environment"].get("device") or "unknown device") for r in records})
    return f"{'/'.join(sources)} ({', '.join(devices)})"


def table_rows(records: list[dict], metric: str = "reserved") -> list[dict]:
    """One row per (setting, optimizer, model) with raw numbers: the data behind every format."""
    field, _ = METRICS[metric]
    records = run_records(records)
    by_key = {(_setting(r), _method(r), r.spec.model): r for r in records}
    paper = paper_settings(records)
    rows = []
    for (setting, method, model), rec in by_key.items():
        value = rec.metrics.get(field)
        adamw = by_key.get((setting, ("adamw", 32, False, "off"), model))
        adamw_value = adamw.metrics.get(field) if adamw else None
        # a measured OOM's peak is cut short by the budget: no percentage can be computed from it
        truncated = adamw is not None and adamw.status == Status.OOM and adamw.source == Source.MEASURED
        extra = (round(100 * (adamw_value / value - 1), 1)
                 if value and adamw_value and rec.status.ran and not truncated and setting in paper else None)
        rows.append({
            "config": rec.config,
            "setting": _setting_title(setting, setting in paper), "paper_grid": setting in paper, "optim": method[0], "state_bits": method[1], "paged": method[2], "peft": method[3],
            "method": _method_label(method), "model": model, "status": rec.status.value,
            "source": rec.source.value, "metric": metric, f"{metric}_bytes": value,
            f"{metric}_gib": None if value is None else round(value / GIB, 3),
            "adamw_extra_pct": extra,
            "adamw_status": adamw.status.value if adamw and setting in paper else None,
            "over_budget_bytes": rec.metrics.get("over_budget_bytes"),
            "peak_reserved_bytes": rec.metrics.get("peak_reserved_bytes"),
            "budget": rec.spec.budget, "budget_bytes": rec.metrics.get("budget_bytes"),
            "usable_bytes": _usable(rec.metrics),
            "skip_reason": rec.skip_reason, "error": rec.error,
        })
    return rows


def _usable(metrics: dict) -> int | None:
    """What the allocator could reserve on the budget card: the card minus the CUDA context (measured where a
    record has it, else the estimate the prediction used)."""
    total = metrics.get("budget_bytes")
    context = metrics.get("context_bytes") or metrics.get("context_bytes_estimate") or CONTEXT_ESTIMATE_BYTES
    return None if total is None else total - context


def _verdict_text(verdict: dict | None) -> str:
    if verdict is None:
        return ""
    v = verdict["verdict"]
    if v == "pass":
        return "trains: pass"
    if v == "fail":
        return "trains: FAIL (" + ", ".join(verdict["failed"]) + ")"
    return f"trains: {v}"


def _cell(row: dict, metric: str) -> str:
    status = row["status"]
    if status == "skipped":
        return "skipped*"
    if status == "error":
        return "error (see results.jsonl)"
    gib = row[f"{metric}_gib"]
    if status == "crashed":
        return "crashed (see results.jsonl)"
    if status == "oom" and (gib is None or row["over_budget_bytes"] is None):
        return f"OOM ({row['source']})"
    if gib is None:
        return f"n/a (no {metric} figure)"
    value = row[f"{metric}_bytes"]
    if status == "oom":
        return _oom_cell(row, metric, value)
    text = _size(value)
    if (row["optim"], row["state_bits"], row["paged"], row["peft"]) == ("adamw", 32, False, "off"):
        return text
    if row["adamw_extra_pct"] is not None:
        oom = " (AdamW OOM)" if row["adamw_status"] == "oom" else ""
        text += f", AdamW {row['adamw_extra_pct']:+.0f}%{oom}"
    elif row["adamw_status"] == "oom":
        text += ", AdamW OOM"
    return text


def _oom_cell(row: dict, metric: str, value: int) -> str:
    """The verdict against what the card offers: peak reserved beside the usable memory (the card minus the
    CUDA context), the NVML view beside the whole card, naming the card and its size."""
    head = f"OOM ({row['source']})"
    if row["budget_bytes"] is None or row["usable_bytes"] is None:
        return f"{head}: needs {_size(value)}, {_size(row['over_budget_bytes'])} over the budget"
    card = card_label(row["budget"], row["budget_bytes"])
    if metric == "nvml-process":
        return f"{head}: needs {_size(value)} of {card}, CUDA context included"
    if metric == "reserved":
        return f"{head}: needs {_size(value)} of {_size(row['usable_bytes'])} usable on {card}"
    # the budget verdict is about reserved: say so rather than mixing it with this metric
    reserved = row["peak_reserved_bytes"]
    return (f"{head}: {metric} {_size(value)}; reserved {_size(reserved)} of {_size(row['usable_bytes'])} usable "
            f"on {card}")


def _sections(records: list[dict], metric: str, verdicts: dict | None) -> list[tuple]:
    """Table 4 per setting: (title, headers, rows, skip reasons)."""
    rows = table_rows(records, metric)
    out = []
    for setting in OrderedDict.fromkeys(r["setting"] for r in rows):
        sub = [r for r in rows if r["setting"] == setting]
        models = _ordered({r["model"] for r in sub}, MODELS)
        methods = sorted({(r["optim"], r["state_bits"], r["paged"], r["peft"]) for r in sub},
                         key=lambda m: (-m[1], m[2], m[3] != "off", m[3], _rank(m[0], OPTIMS), m[0]))
        cells = {((r["optim"], r["state_bits"], r["paged"], r["peft"]), r["model"]): _cell(r, metric) for r in sub}
        if verdicts:
            for r in sub:
                text = _verdict_text(verdicts.get(r["config"]))
                if text:
                    cells[((r["optim"], r["state_bits"], r["paged"], r["peft"]), r["model"])] += f"; {text}"
        table = [[_method_label(m)] + [cells.get((m, model), "") for model in models] for m in methods]
        reasons = sorted({r["skip_reason"] for r in sub if r["status"] == "skipped"})
        out.append((setting, ["method"] + models, table, reasons))
    return out


def _intro(records: list[dict], metric: str) -> str:
    head = f"Figures: **{_source(records)}**, {METRICS[metric][1]}. "
    paper = paper_settings(records)
    if not paper:
        return head + "A cell is the peak.\n"
    if len(paper) == len({_setting(r) for r in records}):
        return head + "A cell is the peak and how much more memory AdamW needs than that row (the paper's comparison).\n"
    return (head + "A cell is the peak; in the sections on the paper's grid (its models and optimizers at micro-batch "
            "1) also how much more memory AdamW needs than that row (the paper's comparison).\n")


FIT_ONLY = "No run records here: these are `memprof fit` searches, reported in fit.md."


def _title(records: list[dict]) -> str:
    return ("# Table 4: peak memory per optimizer and model\n" if paper_settings(records)
            else "# Peak memory per optimizer and model\n")


def render_markdown(records: list[dict], metric: str = "reserved", verdicts: dict | None = None) -> str:
    if records and not run_records(records):
        return f"# Peak memory per optimizer and model\n\n{FIT_ONLY}\n"
    records = run_records(records)
    out = [_title(records), _intro(records, metric)]
    for setting, headers, table, reasons in _sections(records, metric, verdicts):
        out.append(f"## {setting}\n")
        out.append(tabulate(table, headers=headers, tablefmt="github") + "\n")
        if reasons:
            out.append("\n".join(f"\\* skipped: {reason}" for reason in reasons) + "\n")
    if verdicts:
        out.append("Accuracy verdicts (`trains: ...`) come from accuracy mode: real training of that "
                   "configuration; see accuracy.md beside this report for the checks and their figures.\n")
    out.append(render_ordering_notes(records))
    out.append(render_claims(records, metric))
    out.append(render_overhead(_paper_setups(records), METRICS["reserved"][0]))
    out.append(render_eight_bit_check(records, metric))
    out.append(render_state_bytes(records))
    out.append(render_per_gpu(records))
    out.append(render_floor(records))
    out.append(render_sampler_effect(records))
    out.append(render_reconciliation(records))
    out.append(render_holders(records))
    out.append(render_rules(records))
    return "\n".join(x for x in out if x)


def render_terminal(records: list[dict], metric: str, verdicts: dict | None, width: int) -> str:
    """What a run prints: Table 4's sections and the paper's claims, fitted to the terminal's width (prose
    wrapped, tables fitted). The full report (every table, full configuration keys) is table4.md."""
    import textwrap

    def prose(text: str) -> str:
        return "\n".join(textwrap.fill(p, width, subsequent_indent="  " if p.startswith(("-", "*")) else "")
                         for p in text.replace("**", "").replace("## ", "").splitlines() if p.strip())

    if records and not run_records(records):
        return prose(FIT_ONLY.replace("`", ""))
    records = run_records(records)
    out = [prose(_intro(records, metric))]
    for setting, headers, table, reasons in _sections(records, metric, verdicts):
        out.append("\n" + prose(setting))
        out.append(fit_table(table, headers, width))
        out.extend(prose(f"* skipped: {reason}") for reason in reasons)
    notes = render_ordering_notes(records)
    if notes:
        out.append("\n" + prose(notes))
    claims = _claim_rows(records, metric)
    if claims:
        out.append("\nThe paper's claims beside ours (details in table4.md):")
        out.append(fit_table(claims, claim_headers(metric), width))
    return "\n".join(out)


# (a method that should need less, the one it is compared with): freezing or dropping momentum removes memory
SHOULD_NEED_LESS = (("sgd-fe", "sgd"), ("adamw-fe", "adamw"), ("sgd-fe-nomom", "sgd-fe"), ("sgd-nomom", "sgd"))


def render_ordering_notes(records: list[dict]) -> str:
    """Where a configuration that should need less reserves more, say why (the caching allocator's segments)
    with the allocated figures that show the expected order."""
    paper = paper_settings(records)
    by = {(_setting(r), r["spec"]["model"], _method(r)): r for r in records if r["status"] in ("ok", "oom")}
    lines = []
    for (setting, model, (optim, bits, paged, adapters)), rec in sorted(by.items(), key=lambda kv: str(kv[0])):
        for less, more in SHOULD_NEED_LESS:
            other = by.get((setting, model, (more, bits, paged, adapters)))
            if optim != less or other is None:
                continue
            m, o = rec["metrics"], other["metrics"]
            if None in (m.get("peak_reserved_bytes"), o.get("peak_reserved_bytes")):
                continue
            if m["peak_reserved_bytes"] > o["peak_reserved_bytes"]:
                alloc = (f"allocated {_size(m['peak_allocated_bytes'])} vs {_size(o['peak_allocated_bytes'])}"
                         if m.get("peak_allocated_bytes") is not None and o.get("peak_allocated_bytes") is not None
                         else "allocated figures not recorded")
                lines.append(f"- {model}, {_method_label((less, bits, paged, adapters))} reserves "
                             f"{_size(m['peak_reserved_bytes'])}, more than "
                             f"{_method_label((more, bits, paged, adapters))} "
                             f"({_size(o['peak_reserved_bytes'])}), though it needs less: the caching allocator "
                             f"keeps freed blocks in segments sized by the order of requests, so a smaller peak can "
                             f"reserve more; {alloc} ({_setting_title(setting, setting in paper)}).")
    if not lines:
        return ""
    return "## Why a leaner method can reserve more\n\n" + "\n".join(lines) + "\n"


def _paper_setups(records: list[dict]) -> dict:
    """The paper's setting (micro-batch 1, no checkpointing, 32-bit, fp32, ordinary step), one group of records per
    optimizer implementation, resident model and source: {label: records}."""
    groups: dict = {}
    runs = run_records(records)
    paper = paper_settings(runs)
    for r in runs:
        s = r.spec
        precision, impl, in_backward, resident, clear, accum, train = _training(s)
        if _setting(r) not in paper or (s.batch_size, s.grad_ckpt, s.state_bits, precision, in_backward, clear, accum,
                                        train, s.peft) != (1, False, 32, "fp32", False, "after-step", 1, "all", "off"):
            continue
        label = (f"{impl}" + (", whole CLIP resident" if resident == "clip" else "")
                 + f"; {r.source} ({r.device or 'unknown device'})")
        groups.setdefault(label, []).append(r)
    return groups


def _paper_setting_rows(records: list[dict], metric: str) -> dict:
    return {(r["model"], r["optim"]): r for r in table_rows(records, metric)
            if r["state_bits"] == 32 and r["peft"] == "off"}


def _ours(row: dict | None) -> str:
    if row is None or row["adamw_extra_pct"] is None:
        return "n/a"
    return f"AdamW {row['adamw_extra_pct']:+.0f}%" + (" (AdamW OOM)" if row["adamw_status"] == "oom" else "")


# each metric as a claims column names it
CLAIM_COLUMN = {"reserved": "peak reserved", "allocated": "peak allocated",
                "nvml-process": "NVML process peak", "live": "peak live tensors"}


def second_metric(metric: str) -> str:
    """The claims table's second view: NVML process memory (what the paper's W&B figures are), or, when the
    table itself is on that, peak reserved (what torch reports)."""
    return "reserved" if metric == "nvml-process" else "nvml-process"


def claim_headers(metric: str) -> list[str]:
    """Two distinct figures of ours: the table's metric, then second_metric's."""
    return ["setup", "model", "paper", f"ours: {CLAIM_COLUMN[metric]}", f"ours: {CLAIM_COLUMN[second_metric(metric)]}",
            "verdict"]


def claim_verdict(model: str, paper_pct: float, row: dict) -> str:
    """agrees: within CLAIM_TOLERANCE_POINTS of the paper's percentage (for ViT-H/14: AdamW OOM at 12 GB and at
    least the paper's gain); otherwise differs, saying how."""
    ours = row["adamw_extra_pct"]
    if row["status"] != "ok":
        return f"differs: this method is {row['status']} here"
    if model == "vit-h-14":
        if row["adamw_status"] != "oom":
            return "differs: AdamW fits here"
        if ours is None:
            return "agrees (AdamW OOM; its full need was not measured)"
        return "agrees" if ours >= paper_pct else f"differs: gain {ours:+.0f}% < {paper_pct}%"
    if ours is None:
        return "differs: no figure"
    gap = ours - paper_pct
    if abs(gap) <= CLAIM_TOLERANCE_POINTS:
        return f"agrees ({gap:+.0f} points)"
    return f"differs: {gap:+.0f} points" + (" (same direction)" if ours > 0 else " (opposite direction)")


def _claim_rows(records: list[dict], metric: str) -> list[list]:
    """One row per paper claim and setup (optimizer implementation, resident model, source) that has figures."""
    lines = []
    for setup, group in _paper_setups(records).items():
        rows = _paper_setting_rows(group, metric)
        device_rows = _paper_setting_rows(group, second_metric(metric))
        for model, optim, paper_pct, claim in PAPER_CLAIMS:
            row = rows.get((model, optim))
            if row is not None:
                lines.append([setup, model, claim, _ours(row), _ours(device_rows.get((model, optim))),
                              claim_verdict(model, paper_pct, row)])
    return lines


def _table_section(title: str, text: str, rows: list, headers: list) -> str:
    """A report section: `## title`, its text, then the rows as a table; none without rows."""
    if not rows:
        return ""
    return f"## {title}\n\n{text}\n\n" + tabulate(rows, headers=headers, tablefmt="github") + "\n"


def render_claims(records: list[dict], metric: str = "reserved") -> str:
    """The paper's claims beside ours, for the paper's setting (micro-batch 1, no checkpointing, 32-bit)."""
    return _table_section("The paper's claims beside ours", (
            "Paper: peak memory from Weights & Biases system metrics (NVML: the whole process, CUDA context "
            "included) on a 12 GB Titan-X, with the PyTorch of 2022. Ours: " + METRICS[metric][1] + " and, "
            + ("closer to what NVML sees, " if metric != "nvml-process" else "what torch reports, ")
            + METRICS[second_metric(metric)][1] + f"; {_source(records)}. A percentage agrees "
            f"when it is within {CLAIM_TOLERANCE_POINTS} points of the paper's. Today's PyTorch runs "
            "AdamW in its foreach implementation, whose step holds one extra full-size copy of the trainable "
            "parameters, which widens the gap; a fixed per-process overhead (context, anything else the process "
            "keeps on the GPU) narrows the paper's percentages."), _claim_rows(records, metric), claim_headers(metric))


def render_eight_bit_check(records: list[dict], metric: str) -> str:
    """Does 8-bit AdamW need less than fp32 SGD with momentum? Said for every model where both ran."""
    rows = {(r["model"], r["optim"], r["state_bits"], r["setting"]): r for r in table_rows(records, metric)
            if r["peft"] == "off"}
    lines = []
    for (model, optim, bits, setting), row in sorted(rows.items()):
        if (optim, bits) != ("adamw", 8) or row[f"{metric}_bytes"] is None:
            continue
        sgd = rows.get((model, "sgd", 32, setting))
        if sgd is None or sgd[f"{metric}_bytes"] is None:
            continue
        below = row[f"{metric}_bytes"] < sgd[f"{metric}_bytes"]
        lines.append(f"- {model} ({setting}): AdamW with 8-bit states {_size(row[f'{metric}_bytes'])} vs SGD "
                     f"{_size(sgd[f'{metric}_bytes'])}: {'below' if below else 'NOT below'} fp32 SGD with momentum")
    if not lines:
        return ""
    return "## 8-bit AdamW against fp32 SGD with momentum\n\n" + "\n".join(lines) + "\n"


def render_rules(records: list[dict]) -> str:
    """What a prediction assumed: every CUDA rule the records name, with its summary and source."""
    names = list(OrderedDict.fromkeys(n for r in records if r["source"] == "predicted"
                                      for n in r["metrics"].get("rules", [])))
    if not names:
        return ""
    from memprof.simulation import rule_descriptions

    known = rule_descriptions()
    lines = [[n, *known.get(n, ("(unknown rule)", ""))] for n in names]
    return _table_section("How the predictions were made", "The training steps ran on fake CPU tensors (no data, no "
                          "memory); every storage's allocation and release was replayed through a model of CUDA's "
                          "caching allocator with these rules:", lines, ["rule", "what it models", "source"])


def render_state_bytes(records: list[dict]) -> str:
    """Optimizer state bytes per trainable parameter, measured from the state tensors themselves."""
    rows = {}
    for r in records:
        m = r["metrics"]
        if r["status"] in ("ok", "oom") and m.get("state_bytes_per_trainable_param") is not None:
            method = _method(r)
            rows.setdefault((method, r["spec"]["model"]), [_method_label(method), r["spec"]["model"],
                            m["state_bytes_per_trainable_param"], m.get("state_params_fp32_kept", ""),
                            4 + 4 + m["state_bytes_per_trainable_param"]])
    table = [rows[k] for k in sorted(rows, key=lambda k: (_rank(k[1], MODELS), k[1], -k[0][1], k[0][2],
                                                           _rank(k[0][0], OPTIMS)))]
    return _table_section("Bytes per trainable parameter", ("Optimizer state bytes per trainable parameter, read from the "
            "state tensors after the run (for 8-bit states: uint8 states, fp32 absmax per 256-element block, "
            "fp32 states for tensors under 4096 elements, the shared quantization maps). With the fp32 weight "
            "and gradient added, the paper's accounting: AdamW 16, SGD with momentum 12, without 8."),
        table, ["method", "model", "state B/param", "params kept fp32", "weight+grad+state B/param"])


def per_gpu_rows(records: list[dict]) -> tuple[list, list]:
    """Rank 0's peak allocated per (model, method) and parallelism (none, ddpN, fsdpN), and SGD's saving over
    AdamW in each column: (headers, rows)."""
    def order(col: str) -> tuple:  # none, then ddp by world size, then fsdp by world size
        head = col.split("+")[0]
        kind = head.rstrip("0123456789")
        return ("none", "ddp", "fsdp").index(kind) if kind in ("none", "ddp", "fsdp") else 9, int(head[len(kind):] or 0), col
    cells, cols = {}, set()
    for r in as_records(records):
        peak = r.metrics.get("peak_allocated_bytes")
        if r.status.ran and peak and r.spec.state_bits == 32 and r.spec.peft == "off":
            col = r.spec.parallelism
            cols.add(col)
            cells[(r.spec.model, r.spec.optim, col)] = (peak, r.source.value)
    if not any(c != "none" for c in cols):
        return [], []
    columns = sorted(cols, key=order)
    rows = []
    models = _ordered({m for m, _, _ in cells}, MODELS)
    for model in models:
        for optim in _ordered({o for m, o, _ in cells if m == model}, OPTIMS):
            rows.append([model, _method_label((optim, 32, False))] +
                        [_size(cells[(model, optim, c)][0]) if (model, optim, c) in cells else "" for c in columns])
        if (model, "adamw", columns[0]) in cells and (model, "sgd", columns[0]) in cells:
            rows.append([model, "SGD saves over AdamW"] + [
                f"{100 * (1 - cells[(model, 'sgd', c)][0] / cells[(model, 'adamw', c)][0]):.0f}%"
                if (model, "adamw", c) in cells and (model, "sgd", c) in cells else "" for c in columns])
    sources = sorted({src for _, src in cells.values()})
    return ["model", "method"] + [f"{c} ({'/'.join(sources)})" for c in columns], rows


def render_per_gpu(records: list[dict]) -> str:
    """The per-GPU table: rank 0's peak allocated under DDP and FSDP at each world size."""
    headers, rows = per_gpu_rows(records)
    return _table_section("Per GPU under DDP and FSDP", ("Rank 0's peak allocated bytes at each parallelism and world size "
            "(`ddp8`: DistributedDataParallel over 8 ranks; `fsdp8`: FSDP2 `fully_shard` per block over 8), "
            "predicted on a fake process group (memprof.simulation.distributed). DDP adds its gradient buckets at any world "
            "size; FSDP shards parameters, gradients and optimizer state, so the optimizer's share, and with it "
            "SGD's saving over AdamW, shrinks as the world grows."), rows, headers)


def render_floor(records: list) -> str:
    """Each configuration's floor (weights + gradients + optimizer state, in the dtypes it keeps them) and its
    peak allocated (or live) bytes as a multiple of it: how far a setup is from the least any implementation
    could need."""
    rows = []
    for r in sorted(as_records(records), key=lambda r: r.key):
        m = r["metrics"]
        if r["status"] not in ("ok", "oom") or not m.get("floor_bytes"):
            continue
        peak = m.get("peak_allocated_bytes", m.get("peak_live_bytes"))
        rows.append([r.config, r.source, _size(m["floor_bytes"]),
                     "n/a" if peak is None else _size(peak), m.get("peak_to_floor_ratio") or "n/a"])
    return _table_section("Floor: weights + gradients + optimizer state", "The peak (allocated; live bytes on the cpu "
                          "backend) as a multiple of the floor, each figure predicted or measured as its source says.",
                          rows, ["config", "source", "floor", "peak", "peak / floor"])


def render_sampler_effect(records: list[dict]) -> str:
    """Measured only: what one NVML reading every 15 s (the paper's W&B system metrics) would have recorded,
    from the 5 ms series, beside the true NVML peak."""
    rows = []
    for r in sorted(records, key=lambda r: r["key"]):
        p = r["metrics"].get("nvml_15s_sampler")
        if r["source"] != "measured" or not p:
            continue
        rows.append([r["key"], gib(p["peak_bytes"]), gib(p["lowest_recorded_bytes"]), p["run_s"],
                     p["readings_at_most"], f"{100 * p['share_of_phases_with_no_reading']:.0f}%",
                     "n/a" if p["share_of_time_near_peak"] is None else f"{100 * p['share_of_time_near_peak']:.1f}%"])
    return _table_section("What a 15 s sampler would have recorded (measured)", (
            "The paper's figures come from Weights & Biases system metrics, one NVML reading per 15 s. From our 5 ms "
            "NVML series of the same process: the true peak, the lowest figure such a sampler can report (its "
            "highest reading, at the least lucky phase), how many readings the run allows, how often (over the "
            "sampler's phase) it gets none, and the share of the run within 5% of the peak."), rows,
        ["config", "NVML peak GiB", "15 s sampler, lowest GiB", "run s", "readings", "no reading", "time near peak"])


def render_reconciliation(records: list[dict]) -> str:
    """One view per configuration: allocated -> reserved (allocator cache) -> NVML process (context and
    memory outside PyTorch) -> NVML device (other processes)."""
    rows = []
    for r in sorted(records, key=lambda r: r["key"]):
        m = r["metrics"]
        if r["status"] not in ("ok", "oom") or "peak_reserved_bytes" not in m:
            continue
        alloc, res, proc, dev = (m.get(k) for k in ("peak_allocated_bytes", "peak_reserved_bytes",
                                                     "nvml_process_peak_bytes", "nvml_device_peak_bytes"))
        mib = lambda v: "n/a" if v is None else f"{v / (1 << 20):,.0f}"  # noqa: E731
        rows.append([r["key"], r["source"], mib(alloc), mib(res - alloc), mib(res),
                     mib(None if proc is None else proc - res), mib(proc),
                     mib(None if dev is None or proc is None else dev - proc), mib(dev)])
    return _table_section("One view: allocated, reserved, NVML (MiB, each at its own peak)", (
            "Predicted NVML process memory is peak reserved plus an estimated CUDA context; measured NVML "
            "figures are sampled by PID (other processes count only in the device column)."), rows,
        ["config", "source", "allocated", "+ cache", "= reserved", "+ context/other", "= NVML process",
         "+ other processes", "= NVML device"])


HOLDERS_SHOWN = 5


def render_holders(records: list[dict], n: int = HOLDERS_SHOWN) -> str:
    """The n largest holders of allocated memory at each configuration's peak: the module (parameters,
    gradients and optimizer state under their parameter's module, activations and temporaries under the
    module that made them), with what each holds by category."""
    parts = []
    for r in sorted(records, key=lambda r: r["key"]):
        m = r["metrics"]
        holders = m.get("top_modules_at_peak")
        if r["status"] not in ("ok", "oom") or not holders:
            continue
        rows = [[i + 1, h["module"], f"{h['bytes'] / GIB:.3f}",
                 ", ".join(f"{c.replace('_', ' ')} {v / GIB:.3f}" for c, v in
                           sorted(h.get("categories_bytes", {}).items(), key=lambda kv: -kv[1]) if v)]
                for i, h in enumerate(holders[:n])]
        shown = sum(h["bytes"] for h in holders[:n])
        parts.append(f"### {r['key']} ({r['source']})\n\nPeak {m['peak_allocated_bytes'] / GIB:.2f} GiB allocated in "
                     f"{m.get('peak_phase', '?')} step {m.get('peak_step', '?')} ({m.get('peak_op', '?')}); the "
                     f"{len(rows)} largest holders hold {shown / GIB:.2f} GiB of it.\n\n"
                     + tabulate(rows, headers=["#", "holder (module)", "GiB", "what (GiB)"], tablefmt="github") + "\n"
                     + ("\nBy block: " + ", ".join(f"{b['module']} {b['bytes'] / GIB:.3f} GiB"
                                                   for b in m["top_blocks_at_peak"][:n]) + "\n"
                        if m.get("top_blocks_at_peak") else ""))
    if not parts:
        return ""
    return ("## Largest holders at the peak\n\nAllocated bytes (allocator blocks) held at each configuration's peak, "
            "by module.\n\n" + "\n".join(parts))


def render_csv(records: list[dict], metric: str = "reserved") -> str:
    rows = table_rows(records, metric)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["setting"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def render_json(records: list[dict], metric: str = "reserved") -> str:
    return json.dumps({"metric": metric, "metric_label": METRICS[metric][1], "source": _source(records),
                       "rows": table_rows(records, metric)}, indent=2, sort_keys=True) + "\n"


def _plot_parts(r: Record) -> dict:
    """What tells a bar apart, slot by slot: model, method and every setting (precision, optimizer
    implementation, checkpointing, batch, budget, parallelism), then the source."""
    s = r.spec
    precision, impl, in_backward, resident, clear, accum, train = _training(s)
    return {"model": s.model, "optim": s.optim, "bits": "8-bit" if s.state_bits == 8 else "",
            "clear": "" if clear == "after-step" else f"clear {clear}",
            "accum": "" if accum == 1 else f"accum {accum}", "train": "" if train == "all" else f"train {train}",
            "peft": "" if s.peft == "off" else s.adapters,
            "paged": "paged" if s.paged else "", "precision": precision,
            "impl": impl if impl != "foreach" else "", "in_backward": "in-backward" if in_backward else "",
            "resident": "clip resident" if resident == "clip" else "", "ckpt": "ckpt" if s.grad_ckpt else "",
            "batch": f"bs{s.batch_size}", "budget": s.budget,
            "parallel": s.parallelism if s.parallelism != "none" else "", "source": f"[{r.source}]"}


def plot_labels(records: list[dict]) -> tuple[list[str], str]:
    """The plot's row labels, in plot_rows' order, and what every row shares (said once, in the title):
    distinct for distinct configurations (where two would still read the same, e.g. differing only in
    --freeze, each carries its configuration key instead)."""
    recs = [r for r, _ in plot_rows(records)]
    parts = [_plot_parts(r) for r in recs]
    shared = [k for k in (parts[0] if parts else {}) if k not in ("model", "optim")
              and len({p[k] for p in parts}) == 1 and len(parts) > 1]
    labels = [" · ".join(v for k, v in p.items() if v and k not in shared) for p in parts]
    common = " · ".join(parts[0][k] for k in shared if parts[0][k]) if parts else ""
    return ([label if labels.count(label) == 1 else f"{r.key} [{r.source}]" for label, r in zip(labels, recs)],
            common)


def plot_rows(records: list) -> list[tuple[Record, str]]:
    """The plot's rows, top to bottom: every record (none dropped) with the note written in its row."""
    recs = sorted(run_records(records), key=lambda r: (_rank(r.spec.model, MODELS), r.spec.model, str(_setting(r)),
                                                       -_method(r)[1], _rank(r.spec.optim, OPTIMS)))
    notes = {Status.OOM: "OOM", Status.SKIPPED: "skipped", Status.ERROR: "error", Status.CRASHED: "crashed"}
    return [(r, notes.get(r.status, "")) for r in recs]


def render_plot(records: list[dict], path: str) -> None:
    """Horizontal stacked bars, one per configuration, its label on one line (readable for any number of
    configurations): the breakdown at the peak (allocated bytes by category, in the palette every memprof
    picture uses) and the allocator's cache on top, so a bar ends at peak reserved, the figure Table 4 shows
    and the one the budget is judged on; the budget line is the card's usable memory (the card minus the
    CUDA context). A measured CUDA run has no breakdown: its peak allocated is one grey bar. A configuration
    without a figure (skipped, error, crashed) keeps its row with its status written in it. The legend sits
    beside the axes, never over a bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from memprof.reports.palette import (BUDGET_COLOR, CACHE_COLOR, CATEGORY_COLORS, MEASURED_COLOR,
                                         category_label)
    from memprof.simulation import CATEGORIES

    rows = plot_rows(records)
    recs = [r for r, _ in rows]
    n = max(1, len(recs))
    fig, ax = plt.subplots(figsize=(12, max(3.0, 1.9 + 0.28 * n)))
    y = list(range(n))[::-1][:len(recs)]
    lefts = [0.0] * len(recs)

    def stack(vals, **style):
        ax.barh(y, vals, left=lefts, **style)
        return [a + v for a, v in zip(lefts, vals)]

    for cat in CATEGORIES:
        vals = [(r["metrics"].get("breakdown_at_peak_bytes") or {}).get(cat, 0) / GIB for r in recs]
        lefts = stack(vals, color=CATEGORY_COLORS[cat], label=category_label(cat))
    whole = [0.0 if r["metrics"].get("breakdown_at_peak_bytes") else
             (r["metrics"].get("peak_allocated_bytes") or 0) / GIB for r in recs]
    if any(whole):
        lefts = stack(whole, color=MEASURED_COLOR, label="measured peak allocated (no breakdown)")
    cache = [max(0, (r["metrics"].get("peak_reserved_bytes") or 0) - (r["metrics"].get("peak_allocated_bytes") or 0))
             / GIB if r["metrics"].get("peak_reserved_bytes") is not None and left else 0.0
             for r, left in zip(recs, lefts)]
    if any(cache):
        lefts = stack(cache, color=CACHE_COLOR, hatch="///", edgecolor="#999", linewidth=0,
                      label="allocator cache (reserved, not allocated)")
    for i, (r, note) in enumerate(rows):
        if note:
            ax.text(lefts[i], y[i], f" {note}", va="center", fontsize=7,
                    color=BUDGET_COLOR if note == "OOM" else "dimgrey")
    budgets = {}
    for r in recs:
        usable = _usable(r["metrics"])
        if r["metrics"].get("budget_bytes") and usable:
            budgets.setdefault(usable, card_label(r["spec"]["budget"], r["metrics"]["budget_bytes"]))
    for usable, card in sorted(budgets.items()):
        ax.axvline(usable / GIB, color=BUDGET_COLOR, linestyle="--", linewidth=1,
                   label=f"{card}: {usable / GIB:.2f} GiB usable (for peak reserved)")
    labels, common = plot_labels(records)
    ax.set_yticks(y, labels, fontsize=7)
    ax.set_xlim(0, max(lefts + [u / GIB for u in budgets] + [1e-3]) * 1.12)  # room for the notes
    ax.set_xlabel("GiB at the peak: allocated by category, then the allocator's cache (the bar ends at peak reserved)"
                  if any(cache) else "GiB at the peak, by category")
    ax.set_title(f"Peak memory by category: {_source(records)}" + (f"; every bar: {common}" if common else ""),
                 fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    save_figure(fig, path)


def save_figure(fig, path: str) -> None:
    """Lay out, save (dpi 110) and close a matplotlib figure; a failing write is one line naming the path."""
    import matplotlib.pyplot as plt

    from memprof.results import write_error

    fig.tight_layout()
    try:
        fig.savefig(path, dpi=110)
    except OSError as exc:
        raise write_error(path, exc) from None
    finally:
        plt.close(fig)


def write_reports(records: list[dict], out_dir: str, metric: str = "reserved", verdicts: dict | None = None,
                  stem: str = "table4") -> dict:
    """Writes <stem>.md/.csv/.json/.png (and accuracy.md when there are verdicts) into out_dir; returns the
    paths."""
    from memprof.results import write_text

    paths = {ext: os.path.join(out_dir, f"{stem}.{ext}") for ext in ("md", "csv", "json", "png")}
    texts = {"md": render_markdown(records, metric, verdicts), "csv": render_csv(records, metric),
             "json": render_json(records, metric)}
    if verdicts:
        paths["accuracy"] = os.path.join(out_dir, "accuracy.md")
        texts["accuracy"] = render_verdicts(list(verdicts.values()))
    for ext, text in texts.items():
        write_text(paths[ext], text)
    render_plot(records, paths["png"])
    return paths


def render_verdicts(verdicts: list[dict], width: int | None = None) -> str:
    """Accuracy mode's verdicts: one row per configuration, the figures of every check: markdown (accuracy.md), or
    for a terminal `width` columns wide a fitted table under a plain title."""
    rows = []
    for v in sorted(verdicts, key=lambda v: v["key"]):
        checks = v.get("checks", {})
        figures = []
        if "learns" in checks:
            c = checks["learns"]
            figures.append(f"loss -{c['loss_drop']:.0%}, acc {c['test_accuracy']:.1%} (chance {c['chance']:.0%})")
        if "frozen" in checks:
            c = checks["frozen"]
            figures.append(f"{len(c['frozen'])} frozen, {c['trained']} trained"
                           + (f", {len(c['trained_that_did_not_move'])} did not move" if c["trained_that_did_not_move"] else "")
                           + (f", {len(c['frozen_that_moved'])} frozen moved" if c["frozen_that_moved"] else ""))
        if "checkpointing_exact" in checks:
            figures.append(f"ckpt max |dgrad| {checks['checkpointing_exact']['max_abs_grad_diff']:.1e}")
        if "eight_bit_tracks_32bit" in checks:
            c = checks["eight_bit_tracks_32bit"]
            figures.append(f"8-bit cos {c['update_cosine']:.3f}, acc {c['accuracy_8bit']:.1%} vs {c['accuracy_32bit']:.1%}")
        verdict = v["verdict"] + (f" ({', '.join(v['failed'])})" if v.get("failed") else "")
        rows.append([v["key"], verdict, "; ".join(figures) or v.get("skip_reason") or v.get("error", ""),
                     v.get("seconds", "")])
    if not rows:
        return ""
    first = verdicts[0]
    headers = ["config", "verdict", "figures", "seconds"]
    if width:
        import textwrap

        from memprof.reports.terminal import fit_table

        title = (f"Accuracy mode: does each memory setting still train? Measured on {first['environment']['device']}; "
                 f"the checks and their thresholds: accuracy.md")
        return textwrap.fill(title, width, break_long_words=False) + "\n\n" + fit_table(rows, headers, width) + "\n"
    return ("# Accuracy mode: does each memory setting still train?\n\n"
            f"Measured on {first['environment']['device']}; data: {first.get('data', 'n/a')}; weights: "
            f"{first.get('weights')} (with random init, accuracy shows the setting trains, not how well a "
            "pretrained model fine-tunes). Checks: learns (probe loss falls >= 10%, held-out accuracy >= 2x "
            "chance), frozen (frozen parameters bit-identical, trained ones changed), checkpointing exact "
            "(gradients and first losses equal with and without), 8-bit tracks 32-bit (update cosine >= 0.9 "
            "after 50 steps, accuracy within 10 points).\n\n"
            + tabulate(rows, headers=headers, tablefmt="github") + "\n")
