"""The front cache for fake-tensor dispatch (memprof.simulation.fast_dispatch) builds what FakeTensorMode builds."""

import gc
import weakref

import pytest
import torch
from torch._subclasses.fake_tensor import (DataDependentOutputException, FakeTensor, FakeTensorMode,
                                           in_kernel_invocation_manager)

from memprof.simulation import shared
from memprof.simulation.fast_dispatch import FrontCache, _fake_tensor
from memprof.simulation.simulate import predict
from memprof.spec import RunSpec

aten = torch.ops.aten


def describe(out, args) -> list:
    """Each output's metadata, and which argument's storage it shares (None: a storage of its own)."""
    outs = out if isinstance(out, (tuple, list)) else (out,)
    storages = [a.untyped_storage()._cdata if isinstance(a, torch.Tensor) else None for a in args]
    rows = []
    for t in outs:
        if t is None:
            rows.append(None)
            continue
        cdata = t.untyped_storage()._cdata
        rows.append((tuple(t.shape), t.stride(), t.dtype, t.storage_offset(), t.requires_grad, str(t.device),
                     t.untyped_storage().nbytes(), storages.index(cdata) if cdata in storages else None,
                     type(t).__name__))
    return rows


def calls():
    """(op, args, kwargs) across views, copies, casts, matmuls and multi-output ops, on non-contiguous inputs too."""
    x = torch.empty(4, 6, 8)
    w = torch.empty(8, 5, requires_grad=True)
    nc = x.transpose(0, 2)  # non-contiguous
    return [
        (aten.view.default, (x, [24, 8]), {}),
        (aten.t.default, (w,), {}),
        (aten.transpose.int, (x, 0, 1), {}),
        (aten.expand.default, (x[:1], [3, 6, 8]), {}),
        (aten.detach.default, (w,), {}),
        (aten.select.int, (x, 1, 2), {}),
        (aten.slice.Tensor, (x, 2, 1, 5), {}),
        (aten._unsafe_view.default, (x, [4, 48]), {}),
        (aten.mm.default, (x.view(24, 8), w), {}),
        (aten.addmm.default, (torch.empty(5), x.view(24, 8), w), {}),
        (aten.bmm.default, (x, torch.empty(4, 8, 3)), {}),
        (aten._to_copy.default, (x,), {"dtype": torch.bfloat16}),
        (aten._to_copy.default, (nc,), {"dtype": torch.bfloat16}),
        (aten.clone.default, (nc,), {}),
        (aten.clone.default, (nc,), {"memory_format": torch.contiguous_format}),
        (aten.gelu.default, (nc,), {}),
        (aten.sum.dim_IntList, (x, [0]), {}),
        (aten.mul.Scalar, (x, 2), {}),
        (aten.mul.Scalar, (x.to(torch.int64), 2.0), {}),
        (aten.native_layer_norm.default, (x, [8], torch.empty(8), torch.empty(8), 1e-5), {}),
        (aten.unbind.int, (x, 0), {}),
        (aten.empty_strided.default, ([3, 4], [1, 3]), {"dtype": torch.bfloat16}),  # factories
        (aten.empty.memory_format, ([5, 2],), {}),
        (aten.full.default, ([2, 3], 1.5), {}),
        (aten.zeros.default, ([4],), {"dtype": torch.int64}),
    ]


def test_hits_build_what_fake_tensor_mode_builds():
    cache, mode = FrontCache(), FakeTensorMode()
    with mode, torch._C._AutoDispatchBelowAutograd():  # where the tracker calls it
        for func, args, kwargs in calls():
            expected = describe(func(*args, **kwargs), args)  # FakeTensorMode itself
            first = cache.call(func, args, kwargs)
            hits = cache.hits
            second = cache.call(func, args, kwargs)
            assert describe(first, args) == expected, func
            assert describe(second, args) == expected, func
            assert cache.hits == hits + 1, f"{func} was not cached"
            if isinstance(second, torch.Tensor):
                assert second.fake_mode is mode


def test_a_factory_hit_belongs_to_the_fake_tensor_mode_in_force():
    """The cache outlives a FakeTensorMode (one per process): a factory has no argument to take its mode from."""
    cache = FrontCache()
    args = ([3, 4], [4, 1])
    for _ in range(2):
        with FakeTensorMode() as mode:
            out = cache.call(aten.empty_strided.default, args, {})
            assert out.fake_mode is mode
    assert cache.hits == 1


def test_int_and_float_scalars_are_different_keys():
    """mul(int tensor, 2) stays int64 and mul(int tensor, 2.0) is float: 2 == 2.0 must not share an entry."""
    cache = FrontCache()
    with FakeTensorMode():
        x = torch.empty(3, dtype=torch.int64)
        assert cache.call(aten.mul.Scalar, (x, 2), {}).dtype == torch.int64
        assert cache.call(aten.mul.Scalar, (x, 2.0), {}).dtype == torch.float32


def test_in_place_ops_hit_with_their_own_argument():
    """An in-place op's repeat returns the argument it wrote into (never a rebuilt tensor), and a foreach
    in-place op returns nothing, as FakeTensorMode does; a different layout is another key."""
    cache = FrontCache()
    with FakeTensorMode():
        x, y = torch.empty(3), torch.empty(3)
        for t in (x, y, x):
            assert cache.call(aten.add_.Tensor, (t, t), {}) is t
        assert cache.call(aten._foreach_mul_.Scalar, ([x, y], 2.0), {}) is None
        assert cache.call(aten._foreach_mul_.Scalar, ([x, y], 2.0), {}) is None
        assert cache.hits == 3
        z = torch.empty(4)
        assert cache.call(aten.add_.Tensor, (z, z), {}) is z and cache.hits == 3  # another layout: a miss


def test_what_it_does_not_cache_goes_to_fake_tensor_mode():
    cache = FrontCache()
    with FakeTensorMode():
        x = torch.empty(3)
        for _ in range(2):  # an in-place op that changes its argument's metadata: never cached
            assert cache.call(aten.resize_.default, (torch.empty(3), [6]), {}).shape == (6,)
            assert cache.call(aten.t_.default, (torch.empty(2, 3),), {}).shape == (3, 2)
        assert cache.hits == 0
        const = torch.tensor(2.0)  # a fake constant (its value is known): never keyed
        assert cache.key(aten.mul.Tensor, (const, const), {}) is None
        for _ in range(2):  # data-dependent: FakeTensorMode raises every time
            with pytest.raises(DataDependentOutputException):
                cache.call(aten._local_scalar_dense.default, (x.sum(),), {})
    assert cache.key(aten.mul.Tensor, (torch.ones(2), torch.ones(2)), {}) is None  # real tensors: never keyed


def test_a_tampered_entry_is_caught():
    """Negative control for the comparison above: an entry with the wrong strides builds a different tensor."""
    cache = FrontCache()
    with FakeTensorMode():
        x = torch.empty(4, 6)
        expected = describe(aten.t.default(x), (x,))
        cache.call(aten.t.default, (x,), {})
        key = cache.key(aten.t.default, (x,), {})
        specs, sequence = cache.entries[key]
        shape, stride, *rest = specs[0]
        cache.entries[key] = (((shape, (stride[1], stride[0]), *rest),), sequence)
        assert describe(cache.call(aten.t.default, (x,), {}), (x,)) != expected


def test_predictions_equal_with_the_cache_off(monkeypatch):
    spec = RunSpec("test-vit", "adamw", precision="bf16-amp", optim_impl="fused", budget="titan-x")
    from memprof.simulation.memo import MEMO

    shared.clear()
    hits = MEMO.front.hits
    on = predict(spec)
    assert MEMO.front.hits > hits + 500  # the prediction went through the cache
    monkeypatch.setattr(MEMO, "front", None)
    shared.clear()
    off = predict(spec)
    drop = ("trace_seconds", "elapsed")
    assert on[0] == off[0]
    assert {k: v for k, v in on[1].items() if not k.startswith(drop)} == \
        {k: v for k, v in off[1].items() if not k.startswith(drop)}


def test_a_built_fake_tensor_is_one_fake_tensor_mode_would_make():
    """fast_dispatch._fake_tensor copies a FakeTensor's attributes instead of running its constructor: same
    attributes, type, device and dispatch; the mode is not kept alive by the copy."""
    mode = FakeTensorMode()
    with in_kernel_invocation_manager(mode):
        elems = [torch.empty_strided((3, 4), (1, 3), dtype=torch.bfloat16, device="meta") for _ in range(3)]
    cpu = torch.device("cpu")
    official = FakeTensor(mode, elems[0], cpu)
    first, second = _fake_tensor(mode, elems[1], cpu), _fake_tensor(mode, elems[2], cpu)  # built by __new__, copied
    for t in (first, second):
        assert type(t) is FakeTensor and vars(t) == vars(official)
        assert (t.device, t.shape, t.stride(), t.dtype) == (official.device, official.shape, official.stride(),
                                                            official.dtype)
    with mode:
        added = second + 1
    assert type(added) is FakeTensor
    gone = weakref.ref(mode)
    del mode, official, first, second, elems, added, t
    gc.collect()
    assert gone() is None  # (a prototype holding its mode would keep it, and its entry, alive)
