"""Simulation fidelity: predicted against measured peaks per configuration, and the out-of-memory verdicts side by
side (`memprof fidelity`, the GPU check's fidelity tables)."""

from __future__ import annotations

from tabulate import tabulate

GIB = 1 << 30


def config_of(rec: dict) -> str:
    """A key without its budget: the same configuration measured on one card and predicted for it (the key's
    sixth segment, e.g. `bf16-amp+fused+in-backward`, keeps precision and optimizer implementation apart; a
    parallel run's ninth, e.g. `fsdp8`, is kept)."""
    if rec.get("spec", {}).get("parallel", "none") == "none":
        return rec["key"].rsplit("/", 1)[0]
    head, parallelism = rec["key"].rsplit("@", 1)[0].rsplit("/", 1)
    return head.rsplit("/", 1)[0] + "/" + parallelism


def fidelity_rows(measured: list[dict], predicted: list[dict]) -> list[dict]:
    """Predicted vs measured allocated and reserved peaks, % error per configuration (both ran to the end)."""
    pred = {config_of(r): r for r in predicted if r["source"] == "predicted"}
    rows = []
    for m in sorted(measured, key=config_of):
        p = pred.get(config_of(m))
        if m["source"] != "measured" or p is None or m["status"] != "ok" or "peak_allocated_bytes" not in m["metrics"]:
            continue  # (the cpu backend measures live tensor bytes: nothing to grade a CUDA prediction by)
        row = {"config": config_of(m), "device": m["environment"]["device"]}
        for field in ("peak_allocated_bytes", "peak_reserved_bytes"):
            mv, pv = m["metrics"].get(field), p["metrics"].get(field)
            row[f"measured_{field}"], row[f"predicted_{field}"] = mv, pv
            row[f"{field.split('_')[1]}_error_pct"] = round(100 * (pv - mv) / mv, 2) if mv and pv is not None else None
        rows.append(row)
    return rows


def verdict_rows(measured: list[dict], predicted: list[dict]) -> list[dict]:
    """Every configuration both measured and predicted, with both statuses: does the prediction's fits / out of
    memory verdict agree with the measurement's (an emulated card's OOM pattern is graded here)?"""
    pred = {config_of(r): r for r in predicted if r["source"] == "predicted"}
    rows = []
    for m in sorted(measured, key=config_of):
        p = pred.get(config_of(m))
        if m["source"] != "measured" or p is None or m["status"] not in ("ok", "oom"):
            continue
        rows.append({"config": config_of(m), "measured_status": m["status"], "predicted_status": p["status"],
                     "agrees": m["status"] == p["status"]})
    return rows


def render_fidelity(measured: list[dict], predicted: list[dict]) -> str:
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
