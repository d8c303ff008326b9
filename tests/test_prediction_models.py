"""Models made for prediction: built without drawing the random weights their saved ones replace, and
batch normalisation folded into its convolution. The same outputs either way; a network where folding
would change the output is left exactly as it was."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from spinegrade.models.classifier import LevelClassifier, ModelSpec, load_state, save_state, weights_loaded_after
from spinegrade.models.folding import fold_batch_norms
from spinegrade.models.slice_locator_net import SliceLocatorNet, SliceLocatorSpec


def _trained_looking(model: nn.Module) -> nn.Module:
    """Running statistics and affine weights away from their initial 0/1, as a trained model's are."""
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=generator) * 0.2)
            module.running_var.copy_(torch.rand(n, generator=generator) * 1.5 + 0.25)
            module.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(n, generator=generator) * 0.1)
    return model.eval()


@pytest.mark.parametrize("backbone", ["efficientnet_lite0", "test_resnet"])
def test_a_folded_grader_gives_the_same_logits_without_its_batch_norms(backbone):
    torch.manual_seed(0)
    model = _trained_looking(LevelClassifier(ModelSpec(backbone))).to(memory_format=torch.channels_last)
    images = torch.randint(0, 256, (6, 1, 96, 96), dtype=torch.uint8)
    levels = torch.arange(6) % 5
    with torch.inference_mode():
        before = model(images, levels)
    norms = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    pairs = fold_batch_norms(model, lambda: model(images[:2], levels[:2]))
    assert pairs and sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == norms - len(pairs)
    with torch.inference_mode():
        after = model(images, levels)  # other images than the probe's
    assert torch.allclose(after, before, atol=1e-5), (after - before).abs().max()
    # another fold of the same architecture, other weights: folded from the first one's pairs
    torch.manual_seed(1)
    other = _trained_looking(LevelClassifier(ModelSpec(backbone))).to(memory_format=torch.channels_last)
    with torch.inference_mode():
        before = other(images, levels)
    probed = []
    assert fold_batch_norms(other, lambda: probed.append(1) or other(images[:2], levels[:2]), pairs) == pairs
    assert len(probed) == 2  # before and after: every fold's outputs are compared, its pairs not looked for again
    assert sum(isinstance(m, nn.BatchNorm2d) for m in other.modules()) == norms - len(pairs)
    with torch.inference_mode():
        assert torch.allclose(other(images, levels), before, atol=1e-5)


class PreNormShortcut(nn.Module):
    """A convolution whose output is read twice: by its normalisation and, before it, by a shortcut."""

    def __init__(self):
        super().__init__()
        self.conv, self.norm = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        return self.norm(y) + y


def test_a_network_that_reads_the_convolution_before_its_norm_is_left_as_it_was():
    torch.manual_seed(0)
    model = _trained_looking(PreNormShortcut())
    x = torch.randn(2, 3, 16, 16)
    with torch.inference_mode():
        before = model(x)
    assert fold_batch_norms(model, lambda: model(x)) == []
    assert fold_batch_norms(model, lambda: pytest.fail("the probe ran"), []) == []  # its other folds: nothing to check
    assert isinstance(model.norm, nn.BatchNorm2d)
    with torch.inference_mode():
        assert torch.equal(model(x), before)


def test_only_a_model_in_eval_mode_is_folded():
    model = PreNormShortcut().train()
    with pytest.raises(ValueError):
        fold_batch_norms(model, lambda: model(torch.randn(1, 3, 8, 8)))


@pytest.mark.parametrize("backbone", ["efficientnet_lite0", "test_resnet", "test_convnext", "test_vit",
                                      "swin_tiny_patch4_window7_224", "beit_base_patch16_224", "locator"])
def test_a_model_built_without_its_random_weights_then_loaded_is_the_saved_one(backbone, tmp_path):
    """Built with ``torch.nn.init`` left idle, then loaded: every tensor, and so every output, as the model
    built the usual way and loaded; and the initialisers work again afterwards."""
    def build():
        if backbone == "locator":
            return SliceLocatorNet(SliceLocatorSpec("efficientnet_lite0"))
        return LevelClassifier(ModelSpec(backbone, slices=3))

    torch.manual_seed(0)
    saved = build()
    save_state(saved, tmp_path / "weights.safetensors")
    usual = build()
    load_state(usual, tmp_path / "weights.safetensors")
    with weights_loaded_after():
        assert torch.count_nonzero(nn.init.normal_(torch.zeros(100))) == 0  # the initialisers are idle here
        quick = build()
    load_state(quick, tmp_path / "weights.safetensors")
    mine, theirs = quick.state_dict(keep_vars=False), usual.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert all(torch.equal(a, b) for a, b in zip(quick.buffers(), usual.buffers()))  # those kept out of the weights too
    assert torch.count_nonzero(nn.init.normal_(torch.zeros(100))) > 0  # restored on leaving the block
