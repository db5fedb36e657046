"""`memprof fit`: the largest micro-batch that fits a budget, per configuration.

Each probe is a full prediction (or, on the cuda backend, a measurement in a fresh process) at one batch
size; a probe fits when its status is "ok". The search gallops upward from batch 1, each step
extrapolated from the last two probes' peaks toward the budget (doubling when it cannot be), until a probe
does not fit, then narrows the bracket by interpolation and bisection (`search`). The answer is a batch that fits whose next batch does not, and no probed smaller batch
fails (every failure seen bounds the search from above); where the probes' peaks are not monotone in batch
size (allocator effects) the result says so. The linear fit over every probe that ran to the
end is reported with its largest residual.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

DEFAULT_MAX_BATCH_SIZE = 4096
PEAK_FIELD = "peak_reserved_bytes"  # what the OOM verdict compares with the card's usable memory


@dataclass
class Probe:
    batch_size: int
    status: str  # "ok", "oom", "error", "crashed"
    peak_bytes: int | None  # PEAK_FIELD of the probe (an OOM prediction still has its full need)
    metrics: dict = field(default_factory=dict)
    error: str | None = None
    within_headroom: bool = True  # with --headroom: the peak leaves that much of the card free

    @property
    def fits(self) -> bool:
        return self.status == "ok" and self.within_headroom

    @property
    def verdict(self) -> str:
        """The status, or "over headroom" for a run that fits the card but not with the headroom kept free."""
        return "over headroom" if self.status == "ok" and not self.within_headroom else self.status


@dataclass
class FitResult:
    max_batch_size: int | None  # None: not even batch 1 fits
    probes: list[Probe]
    capped: bool  # the search reached the upper bound and it still fits
    monotone: bool
    fixed_bytes: float | None  # linear fit: peak = fixed + per_sample * batch
    per_sample_bytes: float | None
    residual_bytes: float | None  # largest |peak - fit| over the probes
    failed: str | None = None  # a probe that errored or crashed (the search stops there)

    @property
    def at_max(self) -> Probe | None:
        return next((p for p in self.probes if p.batch_size == self.max_batch_size), None)

    @property
    def next_up(self) -> Probe | None:
        return next((p for p in self.probes if self.max_batch_size is not None
                     and p.batch_size == self.max_batch_size + 1), None)


def linear_fit(points: list[tuple[int, float]]) -> tuple[float, float, float] | None:
    """Least squares peak = a + b * batch over (batch, peak) points; (a, b, largest |residual|)."""
    if len({x for x, _ in points}) < 2:
        return None
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    b = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
    a = my - b * mx
    return a, b, max(abs(y - (a + b * x)) for x, y in points)


def search(probe: Callable[[int], Probe], budget_bytes: float, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE) -> FitResult:
    """The largest batch in [1, max_batch_size] whose probe fits (see the module docstring).

    Probes carry their peak even when they do not fit (a prediction's full need), so the search
    interpolates: it extrapolates from the last two fitting probes to bracket the answer, then narrows the
    bracket by linear interpolation between its ends (regula falsi), falling back to bisection when a
    step makes no progress or a probe has no peak (a measured OOM)."""
    probes: dict[int, Probe] = {}

    def run(batch: int) -> Probe:
        if batch not in probes:
            probes[batch] = probe(batch)
        return probes[batch]

    def done(best: int | None, capped: bool = False, failed: str | None = None) -> FitResult:
        ordered = sorted(probes.values(), key=lambda p: p.batch_size)
        points = [(p.batch_size, p.peak_bytes) for p in ordered if p.peak_bytes is not None
                  and p.status in ("ok", "oom")]
        lf = linear_fit(points)
        peaks = [y for _, y in points]
        return FitResult(best, ordered, capped, monotone=peaks == sorted(peaks), failed=failed,
                         fixed_bytes=lf and lf[0], per_sample_bytes=lf and lf[1], residual_bytes=lf and lf[2])

    def broken(p: Probe) -> str | None:
        return None if p.status in ("ok", "oom") else f"batch {p.batch_size}: {p.status}: {p.error}"

    def toward_budget(a: Probe, b: Probe) -> float | None:
        """The batch where the line through probes a and b reaches the budget."""
        if a.peak_bytes is None or b.peak_bytes is None or b.peak_bytes <= a.peak_bytes \
                or budget_bytes == float("inf"):
            return None
        slope = (b.peak_bytes - a.peak_bytes) / (b.batch_size - a.batch_size)
        return a.batch_size + (budget_bytes - a.peak_bytes) / slope

    prev = run(1)
    if broken(prev):
        return done(None, failed=broken(prev))
    if not prev.fits:
        return done(None)
    lo, hi, nxt = 1, None, 2
    while hi is None:  # bracket: extrapolate from the last two fits (doubling when that cannot be done)
        if lo >= max_batch_size:
            return done(lo, capped=True)
        cur = run(min(nxt, max_batch_size))
        if broken(cur):
            return done(lo, failed=broken(cur))
        if not cur.fits:
            hi = cur.batch_size
            break
        lo = cur.batch_size
        target = toward_budget(prev, cur)
        nxt = 2 * lo if target is None else max(lo + 1, int(target) + 1)
        prev = cur
    stalled = 0
    while hi - lo > 1:  # narrow: lo fits, hi does not (every failure seen is at or above hi)
        target = toward_budget(probes[lo], probes[hi])
        mid = (lo + hi) // 2 if target is None or stalled >= 2 else min(max(int(target), lo + 1), hi - 1)
        if mid == lo + 1 or mid == hi - 1:
            stalled += 1
        p = run(mid)
        if broken(p):
            return done(lo, failed=broken(p))
        lo, hi = (mid, hi) if p.fits else (lo, mid)
    return done(lo)


def as_probe(batch: int, run, predicted: bool, limit_bytes: float | None = None) -> Probe:
    """A probe from one run at `batch`: `run(batch)` returns an Outcome (memprof.backends.base) or a worker's
    result dict ({"status", "metrics", "error"}); an exception is a failed probe, which stops the search and
    says why. A predicted OOM carries the full need; a measured one stops at the failing request, so its peak
    is not used. `limit_bytes` (with --headroom): a run that fits counts only when its peak is within it."""
    from memprof.errors import describe

    try:
        out = run(batch)
    except Exception as exc:
        return Probe(batch, "error", None, {}, describe(exc))
    if isinstance(out, dict):
        status, metrics, error = out["status"], out.get("metrics") or {}, out.get("error")
    else:
        status, metrics, error = out.status, out.metrics, None
    peak = metrics.get(PEAK_FIELD) if status == "ok" or (status == "oom" and predicted) else None
    within = limit_bytes is None or status != "ok" or peak is None or peak <= limit_bytes
    return Probe(batch, status, peak, metrics, error, within)


def usable_bytes(budget: str) -> float:
    """What the allocator may take on the budget card (total minus the CUDA context)."""
    from memprof.budget import parse_budget

    return parse_budget(budget).usable_bytes


def fit_metrics(result: FitResult, budget_bytes: float, headroom_bytes: int = 0) -> dict:
    """A fit as record metrics: the answer, the peak there and the verdict at the next batch, the probes,
    the linear fit; `budget_bytes` is the limit searched against (usable memory less `headroom_bytes`)."""
    at = result.at_max
    nxt = result.next_up
    return {
        **(at.metrics if at else {}),
        "max_batch_size": result.max_batch_size,
        "next_batch_status": nxt.verdict if nxt else None,
        "capped_at_max_batch_size": result.capped,
        "monotone": result.monotone,
        "fit_fixed_bytes": None if result.fixed_bytes is None else round(result.fixed_bytes),
        "fit_bytes_per_sample": None if result.per_sample_bytes is None else round(result.per_sample_bytes),
        "fit_residual_bytes": None if result.residual_bytes is None else round(result.residual_bytes),
        "search_budget_bytes": budget_bytes,
        "search_headroom_bytes": headroom_bytes,
        "probes": [{"batch_size": p.batch_size, "status": p.verdict, PEAK_FIELD: p.peak_bytes,
                    "peak_reserved_bytes": p.metrics.get("peak_reserved_bytes")} for p in result.probes],
        "search_failure": result.failed,
    }


def fit_config(spec, probe, backend, max_batch_size: int | None = None,
               headroom: str | None = None) -> tuple[str, dict]:
    """(status, metrics) of the search for `spec` (its batch size is ignored) with `probe(batch)` (a backend's
    probe, memprof.backends.base.Backend.probe, or a run in a fresh process): "ok" with a max_batch_size, "oom"
    when not even batch 1 fits, "error" when a probe failed before any answer. `headroom` (`5%`, `1GiB`,
    memprof.budget.parse_headroom): the answer's peak reserved leaves that much of the usable memory free."""
    from memprof.backends.base import PREDICTED
    from memprof.budget import parse_headroom

    usable = usable_bytes(spec.budget) if spec.budget != "device" else device_usable_bytes(backend)
    held = 0 if headroom is None or usable == float("inf") else parse_headroom(headroom, int(usable))
    limit = usable - held
    predicted = backend.source == PREDICTED
    result = search(lambda batch: as_probe(batch, probe, predicted, limit if held else None), limit,
                    max_batch_size or DEFAULT_MAX_BATCH_SIZE)
    status = "error" if result.failed and result.max_batch_size is None else (
        "oom" if result.max_batch_size is None else "ok")
    return status, fit_metrics(result, limit, held)


def device_usable_bytes(backend) -> float:
    """The whole device's memory (budget `device`): what the backend's device has (the GPU's total on cuda);
    unbounded where it has no such limit."""
    total = backend.device_total_bytes()
    return float("inf") if total is None else total


def largest_that_fits(budget: str, optims: list[str]) -> str | None:
    """The first (model, optimizer) that fits `budget` at batch 1, from the largest registered model down and
    the given optimizers then the leanest one: what to say when nothing asked for fits."""
    import torch

    from memprof.backends.registry import get
    from memprof.model_sources.open_clip import PAPER_MODELS
    from memprof.models import build_model, resolve_model
    from memprof.spec import RunSpec

    usable = usable_bytes(budget)
    for model in [*reversed(PAPER_MODELS), "test-vit"]:
        with torch.device("meta"):
            weights = sum(p.numel() * 4 for p in build_model(resolve_model(model), 10).parameters())
        if weights > usable:  # its fp32 weights alone do not fit: no need to predict
            continue
        for optim in dict.fromkeys([*optims, "sgd-fe-nomom"]):
            outcome = get("simulate").run(RunSpec(model, optim, budget=budget))
            if outcome.status == "ok":
                return (f"{model} with {optim} (peak reserved "
                        f"{outcome.metrics['peak_reserved_bytes'] / (1 << 30):.2f} GiB)")
    return None
