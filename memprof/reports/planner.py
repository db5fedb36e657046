"""Renderers for the planner: `memprof fit` (largest micro-batch per configuration) and `memprof advise`
(the changes that make a run fit). They only read records; every figure says where it came from."""

from __future__ import annotations

import csv
import io
import os

from tabulate import tabulate

from memprof.budget import gib_figure as _gib
from memprof.records import Record, as_records
from memprof.reports.terminal import fit_table
from memprof.vocabulary import Status

GIB = 1 << 30
MIB = 1 << 20


def _config(rec: Record) -> str:
    """A search's label: model, optimizer, checkpointing, state bits and a precision other than fp32. Not the
    configuration (RunSpec.config): a search's spec says batch 1, where it starts, and the batch is its answer."""
    s = rec.spec
    return "/".join([s.model, s.optim, f"ckpt-{'on' if s.grad_ckpt else 'off'}", f"{s.state_bits}bit"]
                    + ([s.precision] if s.precision != "fp32" else []))


def fit_rows(records: list) -> list[dict]:
    rows = []
    for r in as_records(records):
        if r.task != "fit":
            continue
        m = r.metrics
        notes = []
        if r.status == Status.SKIPPED:
            notes.append(f"skipped: {r.skip_reason}")
        elif r.status == Status.OOM:
            notes.append("batch 1 does not fit")
        elif r.status.failed:
            notes.append(f"{r.status}: {r.error or m.get('search_failure')}")
        if m.get("capped_at_max_batch_size"):
            notes.append(f"still fits at the search bound {m['max_batch_size']} (--max-batch-size)")
        if m.get("monotone") is False:
            notes.append("peak is not monotone in batch size (allocator effects)")
        if m.get("search_failure") and r.status == Status.OK:
            notes.append(f"search stopped: {m['search_failure']}")
        if r.spec.grad_accum > 1 and m.get("max_batch_size"):
            notes.append(f"effective batch {m['max_batch_size'] * r.spec.grad_accum} (micro-batch "
                         f"{m['max_batch_size']} x {r.spec.grad_accum} accumulation)")
        usable = (m.get("search_budget_bytes") or 0) + (m.get("search_headroom_bytes") or 0)
        may_not_fit = r.status == Status.OK and m.get("fits") == "may not fit"
        if may_not_fit:
            notes.append(f"may not fit: the uncertainty band reaches past usable memory; --headroom "
                         f"{suggested_headroom_pct(m, usable)}% gives a batch that surely fits")
        rows.append({
            "config": _config(r), "model": r.spec.model, "optim": r.spec.optim,
            "budget": r.spec.budget, "source": r.source.value, "device": r.device,
            "status": r.status.value, "max_batch_size": m.get("max_batch_size"),
            "peak_reserved_bytes": m.get("peak_reserved_bytes"), "peak_allocated_bytes": m.get("peak_allocated_bytes"),
            "usable_bytes": usable or None, "headroom_bytes": m.get("search_headroom_bytes") or 0,
            "share_of_usable_pct": (round(100 * m["peak_reserved_bytes"] / usable, 1)
                                    if usable and usable != float("inf") and m.get("peak_reserved_bytes") else None),
            "fits": ("may not" if may_not_fit else "yes") if r.status == Status.OK else "no",
            "next_batch_status": m.get("next_batch_status"), "fixed_bytes": m.get("fit_fixed_bytes"),
            "bytes_per_sample": m.get("fit_bytes_per_sample"), "residual_bytes": m.get("fit_residual_bytes"),
            "probes": len(m.get("probes", [])), "notes": "; ".join(notes),
        })
    return rows


def suggested_headroom_pct(metrics: dict, usable_bytes: float) -> int:
    """The whole percentage of usable memory that covers the answer's uncertainty band (upper reserved minus
    reserved): what --headroom needs for a batch that surely fits."""
    import math

    band = (metrics.get("peak_reserved_bytes_upper") or 0) - (metrics.get("peak_reserved_bytes") or 0)
    return max(1, math.ceil(100 * band / usable_bytes)) if usable_bytes and usable_bytes != float("inf") else 1


def _pct(v) -> str:
    return "n/a" if v is None else f"{v:.1f}"


def render_fit(records: list[dict], width: int | None = None) -> str:
    """The fit table: markdown with every column (fit.md), or for a terminal `width` columns wide the answer's
    columns only (the linear fit stays in fit.md and fit.csv)."""
    rows = fit_rows(records)
    if not rows:
        return ""
    sources = sorted({f"{r['source']} ({r['device']})" for r in rows})
    held = sorted({r["headroom_bytes"] for r in rows})
    kept = (f" With --headroom, {', '.join(_gib(h) for h in held)} GiB of it is kept free: a batch fits only when its "
            "peak leaves that." if any(held) else "")
    intro = (f"Figures: **{', '.join(sources)}**. Each probe is a full prediction (or a measurement in a fresh process) "
             "at one batch size; it fits when its status is ok (peak reserved within the card's usable memory: the "
             f"card minus the CUDA context).{kept} 'fits': 'may not' where the prediction's uncertainty band at the "
             "answer reaches past usable memory (the note says the --headroom that surely fits). 'next' is the "
             "verdict one batch above.")
    answer = [[r["config"], r["max_batch_size"] if r["max_batch_size"] is not None else "none",
               _gib(r["peak_reserved_bytes"]), _pct(r["share_of_usable_pct"]), r["fits"], r["next_batch_status"] or ""]
              for r in rows]
    headers = ["config", "max batch", "peak reserved GiB", "% of usable", "fits", "next"]
    if width:  # the notes under the table, each wrapped to the terminal
        import textwrap

        notes = [textwrap.fill(f"{r['config']}: {r['notes']}", width, subsequent_indent="  ")
                 for r in rows if r["notes"]]
        title = (f"Largest micro-batch that fits {', '.join(sorted({r['budget'] for r in rows}))}: "
                 f"{', '.join(sources)}")
        return (textwrap.fill(title, width, break_long_words=False) + "\n\n"
                + fit_table(answer, headers, width) + "\n" + ("\n" + "\n".join(notes) + "\n" if notes else ""))
    table = [a[:1] + [r["budget"]] + a[1:] + [
        _gib(r["fixed_bytes"]), "n/a" if r["bytes_per_sample"] is None else f"{r['bytes_per_sample'] / MIB:.1f}",
        "n/a" if r["residual_bytes"] is None else f"{r['residual_bytes'] / MIB:.1f}", r["probes"], r["notes"]]
        for a, r in zip(answer, rows)]
    return ("# Largest micro-batch that fits\n\n" + intro + " Linear fit of peak reserved against batch over every "
            "probe: fixed + per sample x batch, with its largest residual.\n\n"
            + tabulate(table, headers=headers[:1] + ["budget"] + headers[1:] + [
                "fixed GiB", "MiB / sample", "residual MiB", "probes", "notes"], tablefmt="github") + "\n")


def render_fit_csv(records: list[dict]) -> str:
    rows = fit_rows(records)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["config"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def may_not_fit(metrics: dict) -> bool:
    """A fit's answer sits so close to the budget that the prediction's band reaches past it: the record's
    `may_not_fit` where it has one, else its `fits` reading "may not fit"."""
    if "may_not_fit" in metrics:
        return bool(metrics["may_not_fit"])
    return metrics.get("fits") == "may not fit"


def _usable(metrics: dict) -> float | None:
    """The card's usable memory a fit searched against: its search budget plus any --headroom kept free."""
    budget = metrics.get("search_budget_bytes")
    return None if budget is None else budget + (metrics.get("search_headroom_bytes") or 0)


def plot_fit(records: list[dict], path: str) -> None:
    """Peak reserved against batch size (a log axis from batch 1: no batch below it), one line per
    configuration (its probes), each card's usable memory, the largest fitting batch marked: filled where it
    fits, hollow in amber with the prediction's band up to its upper bound where it may not fit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    from memprof.budget import card_label
    from memprof.reports.palette import BUDGET_COLOR, UNCERTAIN_COLOR

    fits = [r for r in as_records(records) if r.task == "fit" and r.metrics.get("probes")]
    fig, (ax, near) = plt.subplots(1, 2, figsize=(12, 6), gridspec_kw={"width_ratios": [3, 1.15]})
    largest, uncertain, answers = 1, 0, []
    for r in fits:
        m = r["metrics"]
        probes = sorted((p for p in m["probes"] if p.get("peak_reserved_bytes") is not None),
                        key=lambda p: p["batch_size"])
        if not probes:
            continue
        xs = [p["batch_size"] for p in probes]
        largest = max([largest] + xs)
        best = m.get("max_batch_size")
        doubt = best is not None and may_not_fit(m)
        uncertain += doubt
        label = _config(r) + ("" if best is None else f": max batch {best}" + (", may not fit" if doubt else ""))
        line, = ax.plot(xs, [p["peak_reserved_bytes"] / GIB for p in probes], marker=".", label=label)
        at = next((p for p in probes if p["batch_size"] == best), None)
        budget = _usable(m)
        if at and budget and budget != float("inf"):
            upper = max(at["peak_reserved_bytes"], m.get("peak_reserved_bytes_upper") or 0)
            answers.append((_config(r), best, 100 * at["peak_reserved_bytes"] / budget, 100 * upper / budget,
                            doubt, line.get_color()))
        if at and doubt:
            peak = at["peak_reserved_bytes"] / GIB
            upper = max(peak, (m.get("peak_reserved_bytes_upper") or at["peak_reserved_bytes"]) / GIB)
            ax.plot([best, best], [peak, upper], color=UNCERTAIN_COLOR, lw=2.5, solid_capstyle="butt")
            ax.plot([best], [peak], marker="o", ms=9, mfc="white", mec=UNCERTAIN_COLOR, mew=2, ls="none")
        elif at:
            ax.plot([best], [at["peak_reserved_bytes"] / GIB], marker="o", color=line.get_color())
    cards, kept = {}, {}
    for r in fits:
        b = _usable(r["metrics"])
        if b and b != float("inf"):
            total = r["metrics"].get("budget_bytes")
            cards.setdefault(b, card_label(r["spec"]["budget"], total) if total else r["spec"]["budget"])
            if r["metrics"].get("search_headroom_bytes"):  # --headroom: what a batch had to leave free
                kept.setdefault(r["metrics"]["search_budget_bytes"], r["metrics"]["search_headroom_bytes"])
    for b, card in sorted(cards.items()):
        ax.axhline(b / GIB, color=BUDGET_COLOR, linestyle="--", linewidth=1, label=f"{card}: {b / GIB:.2f} GiB usable")
    for b, headroom in sorted(kept.items()):
        ax.axhline(b / GIB, color=BUDGET_COLOR, linestyle=":", linewidth=1,
                   label=f"usable minus --headroom {headroom / GIB:.2f} GiB: {b / GIB:.2f} GiB")
    if uncertain:
        ax.plot([], [], marker="o", ms=7, mfc="white", mec=UNCERTAIN_COLOR, mew=2, color=UNCERTAIN_COLOR, lw=2.5,
                label="may not fit: the prediction's band (to its upper bound) reaches past usable memory")
    ax.set_xscale("log", base=2)
    ax.set_xlim(0.85, largest * 1.25)  # batch sizes start at 1
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_ylim(bottom=0)
    ax.set_xlabel("micro-batch size (log scale)")
    ax.set_ylabel("peak reserved (GiB)")
    sources = sorted({r["source"] for r in fits})
    ax.set_title(f"Peak memory against batch size ({'/'.join(sources) or 'no probes'})"
                 + (f"; {uncertain} of {len(fits)} answers may not fit" if uncertain else ""), fontsize=9)
    ax.legend(fontsize=6.5, loc="upper left")
    _plot_answers(near, answers, sorted({100 * b / u for b, u in ((r["metrics"].get("search_budget_bytes"),
                                                                  _usable(r["metrics"])) for r in fits)
                                          if u and u != float("inf") and b and b < u}))
    from memprof.reports.table4 import save_figure

    save_figure(fig, path)


def _plot_answers(ax, answers: list, kept_pct: list = ()) -> None:
    """Each answer's peak reserved as a share of usable memory, with the band to the prediction's upper bound:
    where the band crosses 100% the answer may not fit; `kept_pct`: where --headroom stops a search (dotted)."""
    import matplotlib.ticker

    from memprof.reports.palette import BUDGET_COLOR, UNCERTAIN_COLOR

    y = list(range(len(answers)))[::-1]
    for yi, (_config_name, _best, pct, upper, doubt, color) in zip(y, answers):
        ax.plot([pct, upper], [yi, yi], color=UNCERTAIN_COLOR if doubt else color, lw=6, alpha=0.45,
                solid_capstyle="butt")
        ax.plot([pct], [yi], marker="o", ms=7, ls="none", **(
            {"mfc": "white", "mec": UNCERTAIN_COLOR, "mew": 2} if doubt else {"color": color}))
    ax.axvline(100, color=BUDGET_COLOR, ls="--", lw=1)
    for pct in kept_pct:
        ax.axvline(pct, color=BUDGET_COLOR, ls=":", lw=1)
    ax.set_yticks(y, ["/".join(name.split("/")[:2]) + f" @ {best}" + (" (may not fit)" if doubt else "")
                      for name, best, _p, _u, doubt, _c in answers], fontsize=7)
    lo = min([p for _n, _b, p, _u, _d, _c in answers] + list(kept_pct) + [97.0])
    hi = max([u for _n, _b, _p, u, _d, _c in answers] + [100.5])
    ax.set_xlim(lo - 0.5, hi + 0.5)
    ax.set_ylim(-0.8, max(len(answers), 1) - 0.2)
    ax.set_xlabel("% of usable memory at the answer\n(dot: prediction; bar: to its upper bound)", fontsize=8)
    ax.set_title("How close each answer is", fontsize=9)
    ax.tick_params(axis="x", labelsize=7)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(5))


def write_fit_reports(records: list[dict], out_dir: str) -> dict:
    from memprof.results import write_text

    paths = {ext: os.path.join(out_dir, f"fit.{ext}") for ext in ("md", "csv", "png")}
    write_text(paths["md"], render_fit(records))
    write_text(paths["csv"], render_fit_csv(records))
    plot_fit(records, paths["png"])
    return paths
