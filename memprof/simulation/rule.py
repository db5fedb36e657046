"""The base of every CUDA rule (memprof.simulation.rules, memprof.simulation.distributed) and the two ways the
exact shortcuts read a rule's state: `copy_state` (what a trace hands to the next, memprof.simulation.shared) and
`snapshot` (plain values to compare, memprof.simulation.repeated_blocks and math_attention). The tracker and the
shortcuts import this module, never the rules themselves."""

from __future__ import annotations


class Rule:
    name = ""
    summary = ""
    source = ""
    forward_only = False  # its mode() acts only inside the forward (autocast, attention): an optimizer's step alone
    # is traced without it (memprof.simulation.shared.trace_windows)
    acts_on = None  # the ops its after_op acts on (the tracker calls it for these only); None: every op

    def before_op(self, tracker, func, args, kwargs) -> None:
        pass

    def after_op(self, tracker, func, args, kwargs, out) -> None:
        pass

    def attach(self, tracker, optimizer) -> None:
        """Called once the optimizer is built, for rules that act on it."""

    def metrics(self) -> dict:
        """Figures the rule adds to a prediction."""
        return {}

    def describe(self) -> dict:
        return {"name": self.name, "summary": self.summary, "source": self.source}


def copy_state(state: dict) -> dict:
    """A rule's attributes (vars(rule)) with its containers copied, so a later change does not reach back."""
    return {k: type(v)(v) if isinstance(v, (dict, list, set)) else v for k, v in state.items()}


def snapshot(rule) -> dict:
    """A rule's attributes as plain values, holding no tensor (a held tensor would outlive its release): counts
    and dicts of counts as they are, other containers by their length."""
    out = {}
    for k, v in vars(rule).items():
        if v is None or isinstance(v, (int, float, str)):
            out[k] = v
        elif isinstance(v, dict) and all(isinstance(x, (int, str)) for x in (*v.keys(), *v.values())):
            out[k] = dict(v)
        elif isinstance(v, (set, frozenset)) and all(isinstance(x, (int, str, tuple)) for x in v):
            out[k] = frozenset(v)
        else:
            out[k] = (type(v).__name__, len(v) if hasattr(v, "__len__") else id(v))
    return out
