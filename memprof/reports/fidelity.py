"""Simulation fidelity: predicted against measured peaks per configuration, and the out-of-memory verdicts side by
side (`memprof fidelity`, the GPU check's fidelity tables)."""

from __future__ import annotations

from tabulate import tabulate

from memprof.records import Record, as_records
from memprof.vocabulary import Source, Status

GIB = 1 << 30


def _pairs(measured: list, predicted: list) -> list[tuple[Record, Record]]:
    """(measured, predicted) records of each configuration both have (memprof.spec.RunSpec.config: the same
    configuration measured on one card and predicted for it), in the order of their configurations."""
    pred = {r.config: r for r in as_records(predicted) if r.source == Source.PREDICTED}
    return [(m, pred[m.config]) for m in sorted(as_records(measured), key=lambda r: r.config)
            if m.source == Source.MEASURED and m.config in pred]


def fidelity_rows(measured: list, predicted: list) -> list[dict]:
    """Predicted vs measured allocated and reserved peaks, % error per configuration (both ran to the end)."""
    rows = []
    for m, p in _pairs(measured, predicted):
        if m.status != Status.OK or "peak_allocated_bytes" not in m.metrics:
            continue  # (the cpu backend measures live tensor bytes: nothing to grade a CUDA prediction by)
        row = {"config": m.config, "device": m.device}
        for field in ("peak_allocated_bytes", "peak_reserved_bytes"):
            mv, pv = m.metrics.get(field), p.metrics.get(field)
            row[f"measured_{field}"], row[f"predicted_{field}"] = mv, pv
            row[f"{field.split('_')[1]}_error_pct"] = round(100 * (pv - mv) / mv, 2) if mv and pv is not None else None
        rows.append(row)
    return rows


def verdict_rows(measured: list, predicted: list) -> list[dict]:
    """Every configuration both measured and predicted, with both statuses: does the prediction's fits / out of
    memory verdict agree with the measurement's (an emulated card's OOM pattern is graded here)?"""
    return [{"config": m.config, "measured_status": m.status.value, "predicted_status": p.status.value,
             "agrees": m.status == p.status} for m, p in _pairs(measured, predicted) if m.status.ran]


def render_fidelity(measured: list, predicted: list) -> str:
    """The fidelity table (peaks of configurations both ran to the end) and, where any configuration ran out of
    memory, the out-of-memory verdicts side by side."""
    rows = fidelity_rows(measured, predicted)
    verdicts = verdict_rows(measured, predicted)
    if not rows and not verdicts:
        return "No configuration was both measured and predicted.\n"
    text = ""
    if rows:
        gib = lambda v: "n/a" if v is None else f"{v / GIB:.3f}"  # noqa: E731
        table = [[r["config"], gib(r["predicted_peak_allocated_bytes"]), gib(r["measured_peak_allocated_bytes"]),
                  r["allocated_error_pct"], gib(r["predicted_peak_reserved_bytes"]),
                  gib(r["measured_peak_reserved_bytes"]), r["reserved_error_pct"]] for r in rows]
        worst = max(abs(r["allocated_error_pct"] or 0) for r in rows)
        text = (f"# Simulation fidelity: predicted vs measured on {rows[0]['device']}\n\n"
                f"Error = (predicted - measured) / measured. Largest allocated error: {worst:.2f}%.\n\n"
                + tabulate(table, headers=["config", "predicted alloc GiB", "measured alloc GiB", "alloc err %",
                                           "predicted reserved GiB", "measured reserved GiB", "reserved err %"],
                           tablefmt="github") + "\n")
    if any(v["measured_status"] != "ok" or v["predicted_status"] != "ok" for v in verdicts):
        agree = sum(v["agrees"] for v in verdicts)
        text += (f"\n## Out-of-memory verdicts: {agree} of {len(verdicts)} agree\n\n"
                 + tabulate([[v["config"], v["measured_status"], v["predicted_status"],
                              "agrees" if v["agrees"] else "DISAGREES"] for v in verdicts],
                            headers=["config", "measured", "predicted", "verdict"], tablefmt="github") + "\n")
    return text
