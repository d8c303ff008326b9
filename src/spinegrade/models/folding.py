"""Batch normalisation folded into the convolution before it, for a model that only predicts.

In eval mode a BatchNorm2d is an affine map per channel with fixed statistics, so when it reads a
convolution's output directly it can be absorbed into that convolution's weights and bias
(``torch.nn.utils.fusion.fuse_conv_bn_weights``) and dropped: one pass over the feature map fewer per
block. On a 2-core CPU, channels-last, an EfficientNet-Lite0 grader's forward takes about 0.6x the
time, and its logits move by a few 1e-6 (float32 rounding).

Which normalisation reads which convolution is found by running the model once on a probe batch,
not from the backbone's attribute names, so it holds for any timm backbone: a norm layer whose input
is the very tensor a convolution returned is paired with it. A network whose convolution's output is
also read elsewhere (before its normalisation) would change; the probe's outputs before and after
are compared, and the model is given back exactly as it was when they differ.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

# The probe's outputs may move by float32 rounding, no more: relative to their largest magnitude.
TOLERANCE = 1e-4


def _after_norm(norm: nn.BatchNorm2d) -> nn.Module | None:
    """What is left of ``norm`` once its affine map is folded away: nothing for a plain BatchNorm2d;
    timm's BatchNormAct2d keeps its dropout and activation. None: a subclass whose forward is not known."""
    if type(norm) is nn.BatchNorm2d:
        return nn.Identity()
    try:
        from timm.layers import BatchNormAct2d
    except ImportError:
        return None
    if type(norm) is BatchNormAct2d:
        return nn.Sequential(norm.drop, norm.act)
    return None


def conv_norm_pairs(model: nn.Module, probe: Callable[[], torch.Tensor]) -> tuple[list[tuple[str, str]], torch.Tensor]:
    """(convolution, normalisation) module names where the normalisation reads the convolution's output
    itself, as seen running ``probe`` (a call of ``model`` on a small batch), and the probe's output."""
    outputs: dict[str, torch.Tensor] = {}  # held, so no later tensor reuses an output's identity
    pairs: list[tuple[str, str]] = []
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            hooks.append(module.register_forward_hook(lambda m, i, o, name=name: outputs.__setitem__(name, o)))
        elif isinstance(module, nn.BatchNorm2d) and module.track_running_stats and _after_norm(module) is not None:
            hooks.append(module.register_forward_pre_hook(
                lambda m, i, name=name: pairs.extend((c, name) for c, o in outputs.items() if o is i[0])))
    try:
        with torch.inference_mode():
            output = probe().float().clone()
    finally:
        for hook in hooks:
            hook.remove()
    return list(dict.fromkeys(pairs)), output  # a module run twice (a shared block) is paired once


def fold_batch_norms(model: nn.Module, probe: Callable[[], torch.Tensor],
                     pairs: list[tuple[str, str]] | None = None) -> list[tuple[str, str]]:
    """Fold every BatchNorm2d that reads a convolution's output into that convolution, in place, for an
    eval-mode ``model`` on its final device and memory format. Returns the (convolution, norm) pairs
    folded: none when none was found or the probe's outputs moved (the model is then unchanged).
    ``pairs``: what this returned for another model of the same architecture (a backbone's other
    folds): taken as they are instead of being looked for, since which layer reads which is a property
    of the architecture; the probe's outputs are still compared, for every model."""
    if model.training:
        raise ValueError("batch normalisation is folded only into a model in eval mode")
    if pairs is None:
        if not any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):  # a transformer, a ConvNeXt: nothing to run
            return []
        pairs, before = conv_norm_pairs(model, probe)
    elif pairs:
        with torch.inference_mode():
            before = probe().float().clone()
    if not pairs:  # none found, or none kept on the architecture's first model: no probe to run
        return []
    undo = _fold(model, pairs)
    with torch.inference_mode():
        after = probe().float()
    if not torch.allclose(after, before, rtol=0, atol=TOLERANCE * max(1.0, before.abs().max().item())):
        for conv, weight, bias, parent, attribute, norm in reversed(undo):
            conv.weight, conv.bias = weight, bias
            setattr(parent, attribute, norm)
        return []
    return pairs


def _fold(model: nn.Module, pairs: list[tuple[str, str]]) -> list[tuple]:
    """Each pair's norm folded into its convolution; returns what undoes it."""
    undo = []
    for conv_name, norm_name in pairs:
        conv, norm = model.get_submodule(conv_name), model.get_submodule(norm_name)
        parent_name, _, attribute = norm_name.rpartition(".")
        parent = model.get_submodule(parent_name)
        undo.append((conv, conv.weight, conv.bias, parent, attribute, norm))
        with torch.no_grad():
            weight, bias = fuse_conv_bn_weights(conv.weight, conv.bias, norm.running_mean, norm.running_var, norm.eps,
                                                norm.weight, norm.bias)
        # The folded weight keeps the convolution's memory format (channels-last stays channels-last).
        asks = conv.weight.requires_grad
        conv.weight = nn.Parameter(weight.detach().contiguous(memory_format=_format(conv.weight)), requires_grad=asks)
        conv.bias = nn.Parameter(bias.detach(), requires_grad=asks)
        setattr(parent, attribute, _after_norm(norm))
    return undo


def _format(t: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if t.ndim == 4 and t.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
