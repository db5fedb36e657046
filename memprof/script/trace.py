"""The simulated device's side of the engine: its trace (memprof.simulation.tracing.TraceBuilder, filled as the
script runs), the figures torch.cuda reports while it runs (memprof.simulation.replay.Replayer, fed the stream so
far with the rules' rewrites applied, as the prediction applies them to the whole stream), and the record's
prediction through the engine's one entrance (memprof.simulation.simulate.prediction_of)."""

from __future__ import annotations

from memprof.errors import UsageError


def live(sim):
    """The allocator model fed with the stream so far (incrementally while the rewritten prefix stays the same)."""
    events = sim.tracker.events
    for rule in sim.rules:
        if hasattr(rule, "rewrite"):
            folded = getattr(rule, "folded", None)
            events = rule.rewrite(events)
            if folded is not None:
                rule.folded = folded  # the prediction counts the folds of its own rewrite
    return sim.replayer.feed(events, sim.tracker.stream)


def make_trace(sim):
    """The run's Trace: the tracker's stream, what the builder learnt of each storage, the rules' figures."""
    module = sim.attribution.result() if sim.attribution is not None else dict(sim.tracker.module)
    return sim.builder.trace(list(sim.tracker.events), (*sim.rules, *sim.parallel_rules), module)


def predict(sim, out_dir: str | None = None, snapshot_dir: str | None = None, key: str | None = None):
    """(status, metrics) of what ran; with `out_dir` its timeline goes to out_dir/timelines/, with `snapshot_dir`
    the predicted allocator snapshot there (memprof.reports.artifacts.write_artifacts), both named by `key` (the
    record's spec key). The rules that acted during the run hold its state (e.g. which accumulations fold): the
    fresh instances the prediction makes for the same card take it over (Rule.state / load_state)."""
    from memprof.reports.artifacts import write_artifacts
    from memprof.simulation.simulate import prediction_of

    if sim.trace is None:
        raise UsageError("simulated_cuda: no result (the code under it did not finish)")
    ran = sim.rules

    def trace_of(rules):
        if len(rules) != len(ran) or any(type(a) is not type(b) for a, b in zip(rules, ran)):
            raise RuntimeError("cuda_rules gave other rules than those the run used")
        for fresh, old in zip(rules, ran):
            fresh.load_state(old.state())
        return sim.trace

    spec = sim.rule_spec(key)
    p = prediction_of(trace_of, sim.budget, spec, history=out_dir is not None, capped_history=snapshot_dir is not None)
    return p.status, {**p.metrics, **write_artifacts(spec, p, out_dir, snapshot_dir)}
