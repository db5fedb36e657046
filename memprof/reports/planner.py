"""Renderers for the planner: `memprof fit` (largest micro-batch per configuration) and `memprof advise`
(the changes that make a run fit). They only read records; every figure says where it came from."""

from __future__ import annotations

import csv
import io
import os

from tabulate import tabulate

GIB = 1 << 30
MIB = 1 << 20


def _gib(v) -> str:
    return "n/a" if v is None else f"{v / GIB:.2f}"


def _config(rec: dict) -> str:
    s = rec["spec"]
    return "/".join([s["model"], s["optim"], f"ckpt-{'on' if s['grad_ckpt'] else 'off'}", f"{s['state_bits']}bit"]
                    + [s.get(k) for k in ("precision",) if s.get(k) and s.get(k) != "fp32"])


def fit_rows(records: list[dict]) -> list[dict]:
    rows = []
    for r in records:
        if r.get("task") != "fit":
            continue
        m = r["metrics"]
        notes = []
        if r["status"] == "skipped":
            notes.append(f"skipped: {r['skip_reason']}")
        elif r["status"] == "oom":
            notes.append("batch 1 does not fit")
        elif r["status"] in ("error", "crashed"):
            notes.append(f"{r['status']}: {r.get('error') or m.get('search_failure')}")
        if m.get("capped_at_max_batch_size"):
            notes.append(f"still fits at the search bound {m['max_batch_size']} (--max-batch-size)")
        if m.get("monotone") is False:
            notes.append("peak is not monotone in batch size (allocator effects)")
        if m.get("search_failure") and r["status"] == "ok":
            notes.append(f"search stopped: {m['search_failure']}")
        rows.append({
            "config": _config(r), "model": r["spec"]["model"], "optim": r["spec"]["optim"],
            "budget": r["spec"]["budget"], "source": r["source"], "device": r["environment"].get("device"),
            "status": r["status"], "max_batch_size": m.get("max_batch_size"),
            "peak_reserved_bytes": m.get("peak_reserved_bytes"), "peak_allocated_bytes": m.get("peak_allocated_bytes"),
            "next_batch_status": m.get("next_batch_status"), "fixed_bytes": m.get("fit_fixed_bytes"),
            "bytes_per_sample": m.get("fit_bytes_per_sample"), "residual_bytes": m.get("fit_residual_bytes"),
            "probes": len(m.get("probes", [])), "notes": "; ".join(notes),
        })
    return rows


def render_fit(records: list[dict]) -> str:
    rows = fit_rows(records)
    if not rows:
        return ""
    sources = sorted({f"{r['source']} ({r['device']})" for r in rows})
    table = [[r["config"], r["budget"], r["max_batch_size"] if r["max_batch_size"] is not None else "none",
              _gib(r["peak_reserved_bytes"]), r["next_batch_status"] or "", _gib(r["fixed_bytes"]),
              "n/a" if r["bytes_per_sample"] is None else f"{r['bytes_per_sample'] / MIB:.1f}",
              "n/a" if r["residual_bytes"] is None else f"{r['residual_bytes'] / MIB:.1f}", r["probes"], r["notes"]]
             for r in rows]
    return ("# Largest micro-batch that fits\n\n"
            f"Figures: **{', '.join(sources)}**. Each probe is a full prediction (or a measurement in a fresh process) "
            "at one batch size; it fits when its status is ok (peak reserved within the card's usable memory). "
            "The peak is at the largest batch that fits; 'next' is the verdict one batch above. Linear fit of peak "
            "reserved against batch over every probe: fixed + per sample x batch, with its largest residual.\n\n"
            + tabulate(table, headers=["config", "budget", "max batch", "peak reserved GiB", "next", "fixed GiB",
                                       "MiB / sample", "residual MiB", "probes", "notes"], tablefmt="github") + "\n")


def render_fit_csv(records: list[dict]) -> str:
    rows = fit_rows(records)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["config"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def plot_fit(records: list[dict], path: str) -> None:
    """Peak reserved against batch size, one line per configuration (its probes), the budget line, the
    largest fitting batch marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fits = [r for r in records if r.get("task") == "fit" and r["metrics"].get("probes")]
    fig, ax = plt.subplots(figsize=(10, 6))
    for r in fits:
        probes = sorted((p for p in r["metrics"]["probes"] if p.get("peak_reserved_bytes") is not None),
                        key=lambda p: p["batch_size"])
        if not probes:
            continue
        xs = [p["batch_size"] for p in probes]
        line, = ax.plot(xs, [p["peak_reserved_bytes"] / GIB for p in probes], marker=".", label=_config(r))
        best = r["metrics"].get("max_batch_size")
        at = next((p for p in probes if p["batch_size"] == best), None)
        if at:
            ax.plot([best], [at["peak_reserved_bytes"] / GIB], marker="o", color=line.get_color())
    for b in sorted({r["metrics"].get("search_budget_bytes") for r in fits if r["metrics"].get("search_budget_bytes")}):
        if b != float("inf"):
            ax.axhline(b / GIB, color="red", linestyle="--", linewidth=1, label=f"usable {b / GIB:.1f} GiB")
    ax.set_xscale("symlog", linthresh=8)
    ax.set_xlabel("micro-batch size")
    ax.set_ylabel("peak reserved (GiB)")
    sources = sorted({r["source"] for r in fits})
    ax.set_title(f"Peak memory against batch size ({'/'.join(sources) or 'no probes'})", fontsize=9)
    ax.legend(fontsize=6, loc="upper left", ncol=2)
    from memprof.reports.table4 import save_figure

    save_figure(fig, path)


def write_fit_reports(records: list[dict], out_dir: str) -> dict:
    from memprof.results import write_text

    paths = {ext: os.path.join(out_dir, f"fit.{ext}") for ext in ("md", "csv", "png")}
    write_text(paths["md"], render_fit(records))
    write_text(paths["csv"], render_fit_csv(records))
    plot_fit(records, paths["png"])
    return paths
