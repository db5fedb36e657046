"""A deep ViT's forward trace from a trace of four of its blocks: what makes ViT-L/14 (24 blocks) and ViT-H/14
(32) cost about what a 4-block model costs to predict.

Why it can be exact: the residual blocks of a ViT are identical modules run one after another, so the stream
of a training step repeats block by block. Traced with only blocks 0-3 (the others removed from the stack),
each event is tagged with the block running when it happened (module hooks, forward and backward) or, outside
any block, the block that owns the storage it names (parameters at setup, autocast's cast copies, gradients
freed by zero_grad). Block 1's events then serve as the pattern of every middle block and block 2's as the
check: they must match block 1's event for event (kinds, sizes, ops), naming the previous block's storages
where block 1 names block 0's, and so on. The full model's stream is the traced one with n - 4 copies of block
1's events inserted between blocks 1 and 2 wherever they appear, each copy naming fresh storages for its
own and its neighbours' for theirs. Rules' counters (autocast casts, attention kernels) grow by what block 1's
events added; rule attributes a rule declares as `storage_maps` (storage ids, memprof.simulation.rule.Rule) are
copied like events, and those it declares `emptied_each_step` must be empty after the steps.

Where the check fails, the stream is not periodic (a block that differs, a storage shared across blocks)
and the caller traces the whole model (memprof.simulation.shared). tests/test_repeated_blocks.py compares
synthesized and full traces.
"""

from __future__ import annotations

import torch

from collections import defaultdict
from dataclasses import replace

from memprof.simulation.attribution import _ModuleStack
from memprof.simulation.batch_scaling import same_value
from memprof.simulation.rule import snapshot as _snapshot
from memprof.simulation.events import ALLOC, BLOCK, FREE, WINDOW, Block, Window, names_storage, renamed
AFTER = "after"  # a block's forward has returned: the releases of the previous block's storages that follow at once
# (the loop dropping the previous block's output) are the block's
TRACED = 4  # blocks traced: first, pattern, check, last
MIN_BLOCKS = 8  # below this, tracing the whole stack costs little more


class NotPeriodic(Exception):
    """The traced blocks do not repeat exactly: trace the whole model."""


def block_stack(model) -> tuple[torch.nn.Module, str, str, torch.nn.ModuleList] | None:
    """(parent, attribute, module path, blocks) of an open_clip VisionTransformer's residual blocks when there
    are enough of them to gain from synthesis, else None."""
    transformer = getattr(getattr(model, "visual", None), "transformer", None)
    blocks = getattr(transformer, "resblocks", None)
    if not isinstance(blocks, torch.nn.ModuleList) or len(blocks) < MIN_BLOCKS:
        return None
    if len({type(b) for b in blocks}) != 1:
        return None
    return transformer, "resblocks", "visual.transformer.resblocks", blocks


class BlockMarks:
    """Marks in the tracker's stream which block runs (forward, recompute and backward), and snapshots the
    rules' state at each mark."""

    def __init__(self, tracker, blocks, rules):
        self.tracker, self.rules = tracker, rules
        self.current, self.saved, self.snapshots = None, [], []  # per mark: (block, each rule's attributes)
        self._callback = False
        self._handles = []
        for j, block in enumerate(blocks):
            self._handles.append(block.register_forward_pre_hook(lambda m, args, j=j: self._pre(j, args)))
            self._handles.append(block.register_forward_hook(lambda m, args, out, j=j: self._post(j, out)))

    def _mark(self, j) -> None:
        if j != self.current:
            self.current = j
            self.tracker.mark(Block(BLOCK, j))
            self.snapshots.append((j, [_snapshot(r) for r in self.rules]))

    def _pre(self, j, args) -> None:
        self.saved.append(self.current)
        self._mark(j)
        for t in _ModuleStack._grad_tensors(args):  # its gradient ready: the block's backward is over
            t.register_hook(lambda _g, j=j: self._mark(None) if self.current == j else None)

    def _post(self, j, out) -> None:
        for t in _ModuleStack._grad_tensors(out):  # its gradient ready: the block's backward begins
            t.register_hook(lambda _g, j=j: self._backward(j))
        outer = self.saved.pop()  # None, or the block whose backward recomputes this one
        self._mark(outer if isinstance(outer, int) else (AFTER, j))

    def _backward(self, j) -> None:
        if not self._callback:
            torch.autograd.Variable._execution_engine.queue_callback(self._backward_done)
            self._callback = True
        self._mark(j)

    def _backward_done(self) -> None:
        self._callback = False
        self._mark(None)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def _counter_delta(before, after):
    """after - before for a count (int) or a dict of counts; None where the value is not a count."""
    if type(before) is int and type(after) is int:
        return after - before
    if isinstance(before, dict) and isinstance(after, dict) and all(type(v) is int for v in after.values()) \
            and all(type(v) is int for v in before.values()):
        return {k: after.get(k, 0) - before.get(k, 0) for k in set(before) | set(after)}
    return None


class Synthesis:
    """The stream of the full `n`-block model from one traced with `TRACED` blocks (see the module docstring)."""

    def __init__(self, events: list, module: dict, origin: dict, snapshots: list, rules: list[tuple], path: str,
                 n: int):
        self.path, self.n = path, n
        self.rule_names = [name for name, _, _ in rules]  # each rule's declaration (memprof.simulation.rule.declared)
        self.maps = {name: maps for name, maps, _ in rules}
        self.emptied = {name: emptied for name, _, emptied in rules}
        self.module, self.origin = module, origin
        prefix = path + "."
        self._owner: dict[int, int | None] = {}
        for sid, name in module.items():
            if name.startswith(prefix):
                self._owner[sid] = int(name[len(prefix):].split(".", 1)[0])
        tagged, ctx, after = [], None, None
        for ev in events:
            if ev.kind is BLOCK:
                ctx, after = (None, ev.at[1]) if isinstance(ev.at, tuple) else (ev.at, None)
                continue
            if after is not None:  # right after block j: releases of block j - 1's storages are block j's
                if ev.kind is FREE and self.owner(ev.sid) == after - 1:
                    tagged.append((ev, after, after))
                    continue
                after = None
            if names_storage(ev):
                tag = ctx if ctx is not None else self.owner(ev.sid)
            else:
                tag = None
            tagged.append((ev, tag, ctx))
        self.tagged = tagged
        self._check_outer()
        self.pairs = self._pair()
        self.own_map: dict[int, int] = {}  # block 2's storage -> block 1's that plays its part
        self.prev_map: dict[int, int] = {}  # block 0's storage named by block 1 -> block 1's named by block 2
        for a, b, _ in self.pairs:
            self._align(a, b)
        self.deltas = self._rule_deltas(snapshots)
        self._next = max((ev.sid for ev, _, _ in tagged if ev.kind is ALLOC), default=0) + 1
        self.fresh: dict[tuple[int, int], int] = {}  # (position, block 1's storage) -> new storage

    def owner(self, sid) -> int | None:
        return self._owner.get(sid)

    def _rel(self, sid, block: int):
        o = self.owner(sid)
        return None if o is None else o - block

    # --- structure ---------------------------------------------------------------------------------
    def _check_outer(self) -> None:
        """Blocks 0 and 3 keep their places next to blocks 1 and 2: they may name only those."""
        for ev, tag, ctx in self.tagged:
            if not names_storage(ev) or ctx not in (0, TRACED - 1):
                continue
            o = self.owner(ev.sid)
            if o is not None and abs(o - ctx) > 1:
                raise NotPeriodic(f"block {ctx} names a storage of block {o}")

    def _pair(self) -> list:
        """(block 1's segment, block 2's segment, ascending) for each place the pattern repeats: maximal runs of
        events tagged 1 and 2, each next to the other."""
        segments, start = [], 0
        for i in range(1, len(self.tagged) + 1):
            if i == len(self.tagged) or self.tagged[i][1] != self.tagged[start][1]:
                segments.append((self.tagged[start][1], start, i))
                start = i
        pairs, used = [], set()
        for k, (tag, s, e) in enumerate(segments):
            if tag != 1:
                continue
            if k + 1 < len(segments) and segments[k + 1][0] == 2 and k + 1 not in used:
                pairs.append(((s, e), segments[k + 1][1:], True))
                used.add(k + 1)
            elif k > 0 and segments[k - 1][0] == 2 and k - 1 not in used:
                pairs.append(((s, e), segments[k - 1][1:], False))
                used.add(k - 1)
            else:
                raise NotPeriodic(f"block 1's events at {s} have no block 2 events beside them")
        if len(used) != sum(1 for tag, _, _ in segments if tag == 2):
            raise NotPeriodic("block 2 has events where block 1 has none")
        return pairs

    def _align(self, a: tuple, b: tuple) -> None:
        if a[1] - a[0] != b[1] - b[0]:
            raise NotPeriodic(f"blocks 1 and 2 differ in length at events {a[0]} / {b[0]}")
        for i, j in zip(range(*a), range(*b)):
            e1, e2 = self.tagged[i][0], self.tagged[j][0]
            if not _alike(e1, e2):
                raise NotPeriodic(f"blocks 1 and 2 differ: {e1} / {e2}")
            if not names_storage(e1):
                continue
            r1, r2 = self._rel(e1.sid, 1), self._rel(e2.sid, 2)
            if r1 != r2 or r1 not in (-1, 0, 1):
                raise NotPeriodic(f"blocks 1 and 2 name storages of other blocks: {e1} / {e2}")
            if r1 == 0 and self.own_map.setdefault(e2.sid, e1.sid) != e1.sid:
                raise NotPeriodic(f"storage {e2.sid} of block 2 plays two parts")
            if r1 == -1 and self.prev_map.setdefault(e1.sid, e2.sid) != e2.sid:
                raise NotPeriodic(f"storage {e1.sid} of block 0 plays two parts")

    def _rule_deltas(self, snapshots) -> list[dict]:
        """Per rule: what block 1's runs added to each count, checked equal to what block 2's added; any other
        attribute that changes inside them is marked "changed" (storage maps aside: copied like events)."""
        added: dict = {1: [{} for _ in self.rule_names], 2: [{} for _ in self.rule_names]}
        for (block, before), (_, after) in zip(snapshots, snapshots[1:]):
            if block not in added:  # (AFTER, j) included: no op runs there
                continue
            for r, (name, rule_before, rule_after) in enumerate(zip(self.rule_names, before, after)):
                for k in set(rule_before) | set(rule_after):
                    skipped = k in self.maps[name] + self.emptied[name]
                    if skipped or same_value(rule_before.get(k), rule_after.get(k)):
                        continue
                    delta = _counter_delta(rule_before.get(k), rule_after.get(k))
                    added[block][r] = _add(added[block][r], {k: "changed" if delta is None else delta})
        if added[1] != added[2]:
            raise NotPeriodic(f"the rules' state changes differently in blocks 1 and 2: {added[1]} / {added[2]}")
        return added[1]

    # --- the full stream ---------------------------------------------------------------------------
    def _new(self, position: int, sid: int) -> int:
        key = (position, sid)
        if key not in self.fresh:
            self.fresh[key] = self._next
            self._next += 1
            name = self.module.get(sid, "")
            old = f"{self.path}.1"
            self.module_new[self.fresh[key]] = (f"{self.path}.{position}" + name[len(old):]) if name.startswith(old) else name
            self.origin_new[self.fresh[key]] = self.origin.get(sid, "")
        return self.fresh[key]

    def at(self, position: int, sid: int) -> int:
        """Block 1's storage `sid`, or a neighbour's that block 1 names, as the block at `position` names it
        (position 1 is block 1 itself; n - 2 is block 2)."""
        rel = self._rel(sid, 1)
        if rel == 0:
            return sid if position == 1 else self._new(position, sid)
        if rel == -1:
            if position == 1:
                return sid
            analog = self.prev_map.get(sid)  # block 1's storage in the part block 0's plays for block 1
            if analog is None:
                raise NotPeriodic(f"block 2 names nothing where block 1 names block 0's storage {sid}")
            return analog if position - 1 == 1 else self._new(position - 1, analog)
        if rel == 1:
            if position + 1 == self.n - 2:
                return sid
            if sid not in self.own_map:
                raise NotPeriodic(f"block 1 names block 2's storage {sid}, which block 2 never uses as block 1 does")
            return self._new(position + 1, self.own_map[sid])
        raise NotPeriodic(f"block 1 names storage {sid}, outside its neighbours")

    def _block2(self, sid: int) -> int:
        """Block 2's naming, at position n - 2: block 1's storages become the last copy's."""
        return self.at(self.n - 3, sid) if self._rel(sid, 2) == -1 else sid

    def build(self):
        """(events, window marks {(step, which): index}) of the full model; self.module_new/origin_new hold what
        the new storages are."""
        self.module_new, self.origin_new = {}, {}
        copies = list(range(2, self.n - 2))
        starts = {a[0]: (a, b, asc) for a, b, asc in self.pairs}
        starts.update({b[0]: (a, b, asc) for a, b, asc in self.pairs})
        out, windows, i = [], {}, 0

        def emit(span, position):
            for k in range(*span):
                ev = self.tagged[k][0]
                if names_storage(ev):
                    ev = renamed(ev, self.at(position, ev.sid) if position != "block 2" else self._block2(ev.sid))
                out.append(ev)

        while i < len(self.tagged):
            if i in starts:
                a, b, asc = starts[i]
                order = [(a, 1), *[(a, p) for p in copies], (b, "block 2")]
                for span, position in (order if asc else order[::-1]):
                    emit(span, position)
                i = max(a[1], b[1])
                continue
            ev = self.tagged[i][0]
            if ev.kind is WINDOW:
                windows[(ev.step, ev.which)] = len(out)
            else:
                out.append(ev)
            i += 1
        return out, windows

    def rule_state(self, state: list) -> list:
        """The rules' attributes for the full model: counts grown by the copies, storage maps copied."""
        copies = self.n - TRACED
        out = []
        for rule_state, added, name in zip(state, self.deltas, self.rule_names):
            rule_state = dict(rule_state)
            maps = self.maps[name]
            for k, delta in added.items():
                if k in maps:
                    continue
                if delta == "changed":
                    raise NotPeriodic(f"rule {name}: {k} changes in each block and is not a count")
                if isinstance(delta, int):
                    rule_state[k] = rule_state[k] + copies * delta
                else:
                    rule_state[k] = {key: rule_state[k].get(key, 0) + copies * delta.get(key, 0)
                                     for key in set(rule_state[k]) | set(delta)}
            for k in maps:
                rule_state[k] = self._map_storages(rule_state[k])
            if any(rule_state[k] for k in self.emptied[name]):
                raise NotPeriodic(f"rule {name}: {self.emptied[name]} not empty after the steps")
            out.append(rule_state)
        return out

    def _map_storages(self, mapping: dict) -> dict:
        """A {storage: storage} map: entries whose key is block 1's are copied for every copy, named as block 1's
        events name them there; block 2's move with it."""
        out = {}
        for key, value in mapping.items():
            owner = self.owner(key)
            if owner == 1:
                for p in range(1, self.n - 2):
                    out[self.at(p, key)] = self.at(p, value)
            elif owner == 2:
                out[key] = self._block2(value)
            else:
                out[key] = value
        return out


def _alike(e1, e2) -> bool:
    """Whether two events are one pattern's: the same kind and, the storage they name aside, the same fields."""
    if e1.kind is not e2.kind:
        return False
    return renamed(e1, 0) == renamed(e2, 0) if names_storage(e1) else e1 == e2


def _add(x: dict, y: dict) -> dict:
    out = dict(x)
    for k, v in y.items():
        if k not in out:
            out[k] = v
        elif v == "changed" or out[k] == "changed":
            out[k] = "changed"
        elif isinstance(v, int):
            out[k] = out[k] + v
        else:
            out[k] = {key: out[k].get(key, 0) + v.get(key, 0) for key in set(out[k]) | set(v)}
    return out



def expand(traced, marks: BlockMarks, blocks, path: str, rules: list[tuple], traced_order: list,
           traced_trainable: list, full_order: list, full_trainable: list):
    """The forward of the full model (memprof.simulation.shared.Forward) from `traced`, the forward traced with
    only the first TRACED of `blocks`: its stream, storages, gradients and rule state (NotPeriodic where
    the traced blocks do not repeat exactly)."""
    n = len(blocks)
    sentinels = defaultdict(list)  # the stand-in's windows as marks in the stream, to find them after
    for step, (first, end, _) in enumerate(traced.windows):
        sentinels[first].append(Window(WINDOW, step, "first"))
        sentinels[end].append(Window(WINDOW, step, "end"))
    events = []
    for i, ev in enumerate(traced.events):
        events += sentinels.get(i, [])
        events.append(ev)
    events += sentinels.get(len(traced.events), [])
    synth = Synthesis(events, traced.module, traced.origin, marks.snapshots, rules, path, n)
    out, window_at = synth.build()
    source = {0: 0, 1: 1, n - 2: 2, n - 1: 3}  # positions the traced blocks take

    def placed(p: int, sid):
        return sid if sid is None or p in source else synth.at(p, sid)

    sid_of = {id(t): sid for t, sid in zip(traced_order, traced.resident_ids)}
    where = {id(t): (p, k) for p, block in enumerate(blocks) for k, t in enumerate(_device_order(block))}
    traced_sids = [[sid_of[id(t)] for t in _device_order(blocks[b])] for b in range(TRACED)]
    resident = []
    for t in full_order:
        if id(t) in where:
            p, k = where[id(t)]
            resident.append(placed(p, traced_sids[source.get(p, 1)][k]))
        else:
            resident.append(sid_of[id(t)])
    trained = [[q for q in blocks[b].parameters() if q.requires_grad] for b in range(TRACED)]
    in_block = {id(q): (p, k) for p, block in enumerate(blocks)
                for k, q in enumerate(q for q in block.parameters() if q.requires_grad)}
    windows = []
    for step, (_, _, grads) in enumerate(traced.windows):
        made = {id(traced_trainable[i]): rest for i, *rest in grads}
        mapped = []
        for i, q in enumerate(full_trainable):
            if id(q) in in_block:
                p, k = in_block[id(q)]
                rest = made.get(id(trained[source.get(p, 1)][k]))
                if rest is not None:
                    mapped.append((i, placed(p, rest[0]), *rest[1:]))
            elif id(q) in made:
                mapped.append((i, *made[id(q)]))
        windows.append([window_at[(step, "first")], window_at[(step, "end")], mapped])
    module = {sid: _moved(name, path, n) for sid, name in traced.module.items()}
    return replace(traced, events=out, resident_ids=resident, windows=windows, trainable=full_trainable,
                   params={sid for sid in resident if sid is not None}, origin={**traced.origin, **synth.origin_new},
                   module={**module, **synth.module_new}, rule_state=synth.rule_state(traced.rule_state),
                   next_id=synth._next)


def _moved(name: str, path: str, n: int) -> str:
    """A module path of traced block 2 or 3 at its place in the full stack (n - 2, n - 1)."""
    for b, p in ((2, n - 2), (3, n - 1)):
        old = f"{path}.{b}"
        if name == old or name.startswith(old + "."):
            return f"{path}.{p}" + name[len(old):]
    return name


def _device_order(module):
    from memprof.simulation.tracing import to_device_order

    return list(to_device_order(module))
