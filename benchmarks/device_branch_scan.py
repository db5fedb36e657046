"""Which aten ops dispatch differently on fake CUDA and fake CPU tensors, over torch's own OpInfo database.

    python benchmarks/device_branch_scan.py [--out docs/device-branching-scan.json]

For every OpInfo (torch.testing._internal.common_methods_invocations.op_db) that takes fp32 (and bf16), its first
two sample inputs run forward under FakeTensorMode on device "cpu" and on device "cuda" (fake CUDA tensors run
forward without a GPU, not backward), logging each aten op dispatched with its outputs' dtypes and shapes. An
OpInfo whose two logs differ branches on the device somewhere (a composite's `is_cuda()`, a device-aware shape
function: each such entry must be explained by a row of the audit); the aten ops seen in OpInfos whose logs match
on both devices are `same`. The result is the
op-level half of docs/device-branching-ops.md (memprof.simulation.audit reads it): an op a trace shows that is
neither a row of the audit nor `same` here is reported unaudited. Needs `expecttest` (torch's test utilities).
Takes about a minute per dtype on a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def log_ops(fn):
    import torch
    import torch.utils._pytree as pytree
    from torch.utils._python_dispatch import TorchDispatchMode

    class Log(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is not torch.ops.prim.device.default:
                outs = [x for x in pytree.tree_leaves(out) if isinstance(x, torch.Tensor)]
                self.ops.append((str(func), tuple((str(x.dtype), tuple(x.shape)) for x in outs)))
            return out

    with Log() as log:
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - an op that cannot run on a fake device is its own answer
            return tuple(log.ops), type(exc).__name__
    return tuple(log.ops), None


def _without_host_scalars(log):
    """A log without the copies of 0-dim host tensors to the device (a Python scalar or CPU scalar operand: CUDA
    moves it, one 512 B block at most, which the tracker counts as host memory anyway)."""
    if log[:1] == ("samples",):
        return log
    return tuple((tuple((op, outs) for op, outs in ops if not (op == "aten._to_copy.default" and outs and outs[0][1] == ())),
                  err) for ops, err in log)


def classify(logs: dict) -> tuple[str, list]:
    """same | errors (both devices raise: data-dependent, no sample) | host-scalar | differ, and for `differ` the ops
    one device dispatched that the other did not."""
    cpu, cuda = logs["cpu"], logs["cuda"]
    failed = lambda log: log[:1] == ("samples",) or any(err is not None for _, err in log)  # noqa: E731
    if cpu == cuda:
        return ("errors" if failed(cpu) else "same"), []
    if failed(cpu) and failed(cuda):
        return "errors", []
    if _without_host_scalars(cpu) == _without_host_scalars(cuda):
        return "host-scalar", []
    ops = lambda log: set() if log[:1] == ("samples",) else {f"{o}->{outs}" for run, _ in log for o, outs in run}  # noqa: E731
    return "differ", sorted(ops(cpu) ^ ops(cuda))[:6]


def scan(dtype_name: str) -> tuple[dict, set, set, dict]:
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.testing._internal.common_methods_invocations import op_db

    dtype = getattr(torch, dtype_name)
    differ, same_ops, differ_ops, other = {}, set(), set(), {}
    for op in op_db:
        if dtype not in op.supported_dtypes("cpu"):
            continue
        logs = {}
        for device in ("cpu", "cuda"):
            with FakeTensorMode():
                try:
                    samples = list(op.sample_inputs(device, dtype, requires_grad=op.supports_autograd))[:2]
                except Exception as exc:  # noqa: BLE001
                    logs[device] = ("samples", type(exc).__name__)
                    continue
                logs[device] = tuple(log_ops(lambda s=s: op(s.input, *s.args, **s.kwargs)) for s in samples)
        name = op.name + (f".{op.variant_test_name}" if op.variant_test_name else "")
        ops = {o for d in logs.values() if d[:1] != ("samples",) for run in d for o, _ in run[0]}
        kind, diff = classify(logs)
        if kind in ("same", "host-scalar"):
            same_ops |= ops
        elif kind == "differ":
            differ[name] = diff
            differ_ops |= ops
        if kind != "same":
            other.setdefault(kind, []).append(name)
    return differ, same_ops, differ_ops, other


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "device-branching-scan.json"))
    parser.add_argument("--dtypes", default="float32,bfloat16")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    import torch

    start = time.perf_counter()
    differ, same, differs, kinds = {}, set(), set(), {}
    for name in args.dtypes.split(","):
        d, s, o, other = scan(name)
        differ.update({f"{k} ({name})": v for k, v in d.items()})
        same |= s
        differs |= o
        for kind, names in other.items():
            kinds.setdefault(kind, set()).update(names)
    result = {"torch": torch.__version__.split("+")[0], "dtypes": args.dtypes.split(","),
              "method": "benchmarks/device_branch_scan.py: OpInfo forward on fake CPU vs fake CUDA",
              "same": sorted(same), "differ": dict(sorted(differ.items())),
              "errors": sorted(kinds.get("errors", ())), "host-scalar": sorted(kinds.get("host-scalar", ()))}
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)
        fh.write("\n")
    print(f"{len(result['same'])} aten ops alike, {len(differ)} OpInfo entries differ; {time.perf_counter() - start:.0f} s "
          f"-> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
