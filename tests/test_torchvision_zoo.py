"""The torchvision models the zoo sweep could not predict (issue #31), each checked against a hand count or an
un-simulated reference, with a negative control that fails on the old behaviour:

- RegNet computes its stage widths with torch ops and `.tolist()` in its constructor, which cannot run on the meta
  device the simulation builds on: such a model is built with its host-side computations on the CPU and its
  parameters on meta (memprof.model_sources.base.build_on_meta);
- GoogLeNet and Inception v3 return their auxiliary classifiers' logits in training: the step's loss adds their
  weighted cross-entropies (memprof.model_sources.base.classification_loss) and the record's notes say so;
- Inception v3 trains at its weights' crop, 299 px (memprof.model_sources.torchvision.NATIVE_CROP).
"""

import contextlib

import pytest
import torch
import torch.nn.functional as F

from memprof.model_sources import base
from memprof.models import resolve_model
from memprof.simulation.simulate import predict_cpu, prediction
from memprof.simulation.tracing import live_peak, trace
from memprof.spec import RunSpec

REGNET = "torchvision:regnet_x_400mf"


def spec(model, **kw):
    return RunSpec(model=model, optim="adamw", batch_size=2, budget="h100-80g", **kw)


def hand_count_bytes(net) -> int:
    """Every parameter and buffer as the CUDA allocator holds it: numel x element size, rounded up to 512 B."""
    return sum(-(-t.numel() * t.element_size() // 512) * 512 for t in (*net.parameters(), *net.buffers()))


def test_regnet_predicts_with_its_hand_counted_parameter_bytes():
    import torchvision

    net = torchvision.models.regnet_x_400mf(num_classes=spec(REGNET).num_classes)  # for real, on the CPU
    p = prediction(spec(REGNET))
    assert p.status == "ok"
    assert p.metrics["params_total"] == sum(t.numel() for t in net.parameters()) == 5_098_986
    assert p.metrics["breakdown_at_peak_bytes"]["parameters"] == hand_count_bytes(net)


def test_regnet_fails_on_meta_without_the_cpu_rebuild(monkeypatch):
    """Negative control: with the rebuild off (the old behaviour), the constructor's `.tolist()` on meta fails."""
    monkeypatch.setattr(base, "host_side_on_cpu", lambda: pytest.fail("the rebuild was needed"))
    with pytest.raises(NotImplementedError, match="Cannot copy out of meta tensor"), torch.device("meta"):
        import torchvision

        torchvision.models.get_model("regnet_x_400mf", weights=None)
    monkeypatch.setattr(base, "host_side_on_cpu", contextlib.nullcontext)  # "rebuilds" on meta again
    with pytest.raises(NotImplementedError, match="Cannot copy out of meta tensor"):
        prediction(spec(REGNET))


def test_a_model_that_builds_on_meta_is_built_there_once(monkeypatch):
    """Every other model is built exactly as before: on meta, once, without the rebuild."""
    monkeypatch.setattr(base, "host_side_on_cpu", lambda: pytest.fail("rebuilt a model that builds on meta"))
    calls = []
    with torch.device("meta"):
        net = base.build_on_meta(lambda: calls.append(1) or torch.nn.Linear(4, 4))
    assert calls == [1] and net.weight.device.type == "meta"


def test_the_rebuild_keeps_parameters_and_buffers_on_meta_and_hooks_nothing_after():
    with torch.device("meta"):
        with base.host_side_on_cpu():
            assert torch.arange(3).tolist() == [0, 1, 2]  # host-side computations have data
            bn = torch.nn.BatchNorm2d(8)
            scratch = torch.zeros(2)
        later = torch.nn.Linear(2, 2)
    assert {t.device.type for t in (*bn.parameters(), *bn.buffers())} == {"meta"}
    assert isinstance(bn.weight, torch.nn.Parameter) and bn.weight.requires_grad
    assert scratch.device.type == "cpu" and later.weight.device.type == "meta"
    assert torch.nn.Linear(2, 2).weight.device.type == "cpu"  # the hooks are gone


@pytest.mark.slow
def test_regnet_fake_trace_equals_a_real_cpu_run():
    """The simulation's stream (model rebuilt with parameters on meta, fake tensors) has the peak of live bytes
    of the same steps run for real on the CPU (built on the CPU, no rebuild)."""
    _, predicted = predict_cpu(spec(REGNET))
    assert predicted["peak_live_bytes"] == live_peak(trace(spec(REGNET), fake=False)).peak_bytes


def test_aux_outputs_are_trained_on_the_weighted_sum_of_their_losses():
    from torchvision.models import GoogLeNetOutputs
    from torchvision.models.inception import InceptionOutputs

    torch.manual_seed(0)
    labels = torch.tensor([1, 3])
    logits, aux2, aux1 = (torch.randn(2, 5) for _ in range(3))
    ce = [F.cross_entropy(x, labels).item() for x in (logits, aux2, aux1)]
    googlenet = base.classification_loss(GoogLeNetOutputs(logits, aux2, aux1), labels).item()
    assert googlenet == pytest.approx(ce[0] + 0.3 * ce[1] + 0.3 * ce[2])
    assert base.classification_loss(InceptionOutputs(logits, aux1), labels).item() == pytest.approx(
        ce[0] + 0.4 * ce[2])
    assert base.classification_loss(InceptionOutputs(logits, None), labels).item() == pytest.approx(ce[0])
    assert base.classification_loss(logits, labels).item() == pytest.approx(ce[0])  # a tensor: as before
    with pytest.raises(TypeError, match="must be Tensor, not GoogLeNetOutputs"):  # negative control: the old loss
        F.cross_entropy(GoogLeNetOutputs(logits, aux2, aux1), labels)


def model_params(arch):
    import torchvision

    with torch.device("meta"):
        net = torchvision.models.get_model(arch, weights=None, num_classes=spec(arch).num_classes)
    return list(net.named_parameters())


def test_googlenet_predicts_its_aux_heads_and_says_what_loss_it_used(monkeypatch):
    p = prediction(spec("torchvision:googlenet"))
    assert p.status == "ok"
    assert any("GoogLeNetOutputs" in n and "0.3 x cross_entropy" in n for n in p.metrics["notes"])
    # the auxiliary heads train: AdamW keeps two fp32 moments for every parameter, theirs included (a loss on the
    # logits alone leaves aux1/aux2 without gradients, hence without state)
    aux = sum(t.numel() for n, t in model_params("googlenet") if n.startswith(("aux1.", "aux2.")))
    assert aux > 0 and p.metrics["optimizer_state_bytes"] == 8 * p.metrics["params_total"]
    assert "notes" not in prediction(spec("torchvision:resnet18")).metrics  # others' records are unchanged
    # negative control: trained on the main logits alone, the auxiliary heads get no gradient and no state
    from memprof.simulation.memo import MEMO

    MEMO.clear()  # the forward above is cached
    monkeypatch.setattr("memprof.harness.classification_loss", lambda out, labels: F.cross_entropy(out[0], labels))
    state = prediction(spec("torchvision:googlenet")).metrics["optimizer_state_bytes"]
    assert state == 8 * (p.metrics["params_total"] - aux)
    MEMO.clear()


@pytest.mark.slow
def test_googlenet_fake_trace_equals_a_real_cpu_run():
    _, predicted = predict_cpu(spec("torchvision:googlenet"))
    assert predicted["peak_live_bytes"] == live_peak(trace(spec("torchvision:googlenet"), fake=False)).peak_bytes


def test_inception_v3_takes_its_weights_crop_and_others_keep_224():
    assert resolve_model("torchvision:inception_v3").input_shape == (3, 299, 299)
    assert resolve_model("torchvision:inception_v3", input_shape="3x320x320").input_shape == (3, 320, 320)
    for other in ("resnet18", "googlenet", "efficientnet_b7", "vit_h_14"):  # their own crops differ; not changed
        assert resolve_model(f"torchvision:{other}").input_shape == (3, 224, 224)


def test_inception_v3_predicts_at_299_and_not_at_224():
    p = prediction(spec("torchvision:inception_v3"))
    assert p.status == "ok" and any("InceptionOutputs" in n for n in p.metrics["notes"])
    with pytest.raises(RuntimeError, match="Kernel size can't be greater than actual input size"):  # the old input
        prediction(spec("torchvision:inception_v3", input_shape="3x224x224"))
