"""The base of every CUDA rule (memprof.simulation.rules, memprof.simulation.distributed) and the two ways the
exact shortcuts read a rule's state: `copy_state` (what a trace hands to the next, memprof.simulation.shared) and
`snapshot` (plain values to compare, memprof.simulation.repeated_blocks and math_attention). The tracker and the
shortcuts import this module, never the rules themselves."""

from __future__ import annotations


class Rule:
    """A CUDA behaviour the simulation models: hooks on each op (before_op, after_op), on the optimizer
    (attach), and figures it adds (metrics).

    The contract with the exact shortcuts (memprof.simulation.shared, repeated_blocks, batch_scaling): a rule's
    state is its instance attributes. They are copied between traces (copy_state: containers shallow-copied) and
    compared as plain values (snapshot: counts and dicts of counts as they are, other containers by length);
    counts that grow block by block are scaled with the blocks; any other attribute that changes inside a block
    makes the stream "not periodic" and the whole model is traced. Declare here what the shortcuts cannot infer:
    `storage_maps`, attributes that are {storage id: storage id} maps (copied like events, each copy naming its
    own storages), and `emptied_each_step`, attributes that must be empty when a step ends (a per-step cache).
    A rule that holds storage ids anywhere else must not be used with repeated blocks: repeated_blocks refuses
    an attribute that changes in each block and is not a count, naming the rule and the attribute."""

    name = ""
    summary = ""
    source = ""
    forward_only = False  # its mode() acts only inside the forward (autocast, attention): an optimizer's step alone
    # is traced without it (memprof.simulation.shared.trace_windows)
    acts_on = None  # the ops its after_op acts on (the tracker calls it for these only); None: every op
    storage_maps: tuple[str, ...] = ()  # attributes holding {storage id: storage id}
    emptied_each_step: tuple[str, ...] = ()  # attributes empty whenever a step ends

    def before_op(self, tracker, func, args, kwargs) -> None:
        pass

    def after_op(self, tracker, func, args, kwargs, out) -> None:
        pass

    def attach(self, tracker, optimizer) -> None:
        """Called once the optimizer is built, for rules that act on it."""

    def metrics(self) -> dict:
        """Figures the rule adds to a prediction."""
        return {}

    def idle(self) -> bool:
        """Whether the rule had nothing to act on in this run (a script's record leaves it out of `rules`); by
        default a rule always acts (its work is on every run)."""
        return False

    def state(self) -> dict:
        """The rule's state, to hand to another instance made for the same card and spec (load_state): its
        attributes, containers copied (see the class docstring)."""
        return copy_state(vars(self))

    def load_state(self, state: dict) -> None:
        """Take `state` (state()'s) as the rule's whole state."""
        vars(self).clear()
        vars(self).update(copy_state(state))

    def describe(self) -> dict:
        return {"name": self.name, "summary": self.summary, "source": self.source}


def declared(rule) -> tuple[str, tuple, tuple]:
    """(class name, storage_maps, emptied_each_step) of a rule: what the shortcuts read from its declaration."""
    return type(rule).__name__, tuple(getattr(rule, "storage_maps", ())), tuple(getattr(rule, "emptied_each_step", ()))


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
