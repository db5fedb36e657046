"""`--input-shape` on a timm model whose pretrained size differs: built at the asked size (img_size=), or, for a
family that takes any size (CNNs), as it is."""

import torch

from memprof.models import build_model, resolve_model


def _built(name, shape=None):
    with torch.device("meta"):
        return build_model(resolve_model(name, input_shape=shape), 10)


def test_a_vit_is_built_at_the_asked_size():
    net = _built("timm:vit_tiny_patch16_384", "3x224x224").visual
    assert tuple(net.patch_embed.img_size) == (224, 224) and net.pos_embed.shape[1] == 14 * 14 + 1
    with torch.device("meta"):
        assert net(torch.empty(1, 3, 224, 224)).shape == (1, 10)


def test_without_input_shape_it_keeps_its_own_size():
    """Negative control: the pretrained config's 384 x 384 (24 x 24 patches)."""
    net = _built("timm:vit_tiny_patch16_384").visual
    assert tuple(net.patch_embed.img_size) == (384, 384) and net.pos_embed.shape[1] == 24 * 24 + 1


def test_a_cnn_takes_the_size_without_img_size():
    net = _built("timm:resnet18", "3x160x160").visual
    with torch.device("meta"):
        assert net(torch.empty(1, 3, 160, 160)).shape == (1, 10)
