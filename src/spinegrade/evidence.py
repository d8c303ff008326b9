"""Evidence per grade: for each graded crop, where in it the model found the grade it gave.

A class-activation map (Grad-CAM, the ``grad-cam`` package) of the target's grade on what the model
saw (the crop, or the whole slice for a config that grades whole slices; with neighbouring slices as
channels, shown on the centre one), at the backbone's last feature map. Grades blend backbones and
folds; a map is the blend's heaviest backbone's, averaged over its folds (each fold's map scaled to
[0, 1] first, as Grad-CAM scales it), and says so. A fold graded with its mirror too
(``test_time_flip``) gets the mean of the image's map and the mirror's, mirrored back.

Any timm backbone: the model runs as ``forward_head(forward_features(x))`` (timm's own split of
``forward``) with a tap on the feature map between them. A convolutional map (N, C, H, W) is taken
as it is; Swin's (N, H, W, C) is turned channels-first; a transformer's tokens (N, tokens, C) lose
their class and register tokens and are laid on their patch grid (grad-cam's ``reshape_transform``).
A ViT that classifies its class token is read at the input of its last block instead (its last
feature map's patch tokens do not reach the class token, so their gradient is zero), as grad-cam's
own documentation does.

Run for ``spinegrade predict STUDY_DIR`` (on by default there), never for a split or in a kernel: it
sends every crop forward and backward through every fold.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from spinegrade.blend import Blend
from spinegrade.constants import CONDITION_SPECS, LEVELS, SEVERITIES, level_title
from spinegrade.data.preprocess import PreprocessSettings
from spinegrade.errors import SpinegradeError
from spinegrade.findings import located_in
from spinegrade.locating import LocatedStudy
from spinegrade.logs import get_logger
from spinegrade.models.classifier import LevelClassifier
from spinegrade.predict import FoldModel, SplitGrades, load_fold_models, model_inputs

log = get_logger(__name__)

CAM_BATCH = 16  # crops per backward pass
EVIDENCE_DIR = "evidence"  # the maps' PNGs, in a study's output folder


@dataclass
class EvidenceMap:
    """One graded crop and where its model looked: ``image`` the centre slice of what the model saw
    (uint8, H x W), ``heat`` the map on it (float, 0 to 1), explaining ``grade``."""

    condition: str
    level: str  # "L4/L5"
    series: str
    instance_number: int
    frame: int  # its frame in a multi-frame file (from 1); 0: a file of one image
    image: np.ndarray
    heat: np.ndarray
    grade: str
    backbone: str
    folds: int
    whole_slice: bool = False  # the model grades whole slices (its config's ``input: full``), not crops
    turned: bool = False  # the crop was turned for its side, the lateral to the right (``PreprocessSettings.turn_by_side``)


def require_grad_cam() -> None:
    """Refuse, in one line naming the package, evidence maps asked for where grad-cam is not installed."""
    try:
        import pytorch_grad_cam  # noqa: F401
    except ImportError:
        raise SpinegradeError("evidence maps need the grad-cam package: pip install grad-cam "
                              "(or leave them out: --no-evidence)") from None


class FeatureTap(nn.Identity):
    """Marks the backbone's last feature map, for Grad-CAM's hooks."""


class SingleInput(nn.Module):
    """A :class:`LevelClassifier` as the one-input network Grad-CAM calls: the level of the batch is
    held (``level``), and the backbone's feature map passes through a :class:`FeatureTap`. Its output is
    the classifier's, to the last bit (timm's ``forward`` is ``forward_head(forward_features(x))``)."""

    def __init__(self, model: LevelClassifier):
        super().__init__()
        self.model, self.tap = model, FeatureTap()
        self.level: torch.Tensor | None = None

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        backbone = self.model.backbone
        features = self.tap(backbone.forward_features(self.model.normalise(image)))
        pooled = backbone.forward_head(features, pre_logits=True)
        return self.model.head(torch.cat([pooled, self.model.level_embedding(self.level)], dim=1))


def target_layer(wrapper: SingleInput) -> nn.Module:
    """Where the map is read: the tap on the last feature map, or the last block's input for a
    transformer that classifies its class token."""
    backbone = wrapper.model.backbone
    if getattr(backbone, "global_pool", None) == "token" and hasattr(backbone, "blocks"):
        return backbone.blocks[-1].norm1
    return wrapper.tap


def channels_first(backbone: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """Grad-CAM's ``reshape_transform`` for ``backbone``: its feature map as (N, C, H, W)."""
    channels = int(backbone.num_features)

    def reshape(t: torch.Tensor) -> torch.Tensor:
        if t.ndim == 3:  # tokens: the prefix (class, registers) dropped, the patches on their grid
            tokens = t[:, int(getattr(backbone, "num_prefix_tokens", 1)):]
            n = tokens.shape[1]
            grid = tuple(getattr(getattr(backbone, "patch_embed", None), "grid_size", ()) or ())
            h, w = grid if len(grid) == 2 and grid[0] * grid[1] == n else (int(round(n ** 0.5)),) * 2
            if h * w != n:
                raise SpinegradeError(f"{type(backbone).__name__}: {n} patch tokens make no square grid for a map")
            return tokens.reshape(t.shape[0], h, w, t.shape[2]).permute(0, 3, 1, 2)
        if t.ndim == 4 and t.shape[1] != channels and t.shape[-1] == channels:  # channels last (Swin)
            return t.permute(0, 3, 1, 2)
        return t

    return reshape


def gradient_starts_here(module: nn.Module, inputs: tuple) -> tuple:
    """A forward pre-hook on the map's layer: its input as a new leaf that asks for a gradient.

    Grad-CAM needs the class score's gradient at that layer's output and nothing below it. With the
    weights asking for none (:func:`weights_without_gradients`) and the graph starting here, the
    backward pass runs through the layers above the map alone (the head, or a ViT's last block), not
    the whole backbone: the same map, at a fraction of the cost."""
    return tuple(x.detach().requires_grad_(True) if isinstance(x, torch.Tensor) and x.is_floating_point() else x
                 for x in inputs)


@contextmanager
def weights_without_gradients(model: nn.Module):
    """``model``'s parameters ask for no gradient inside the block (as they were afterwards): a map
    needs no weight's gradient, and a weight that asks for one pulls the backward pass down to it."""
    asked = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in asked:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in asked:
            p.requires_grad_(flag)


def class_activation_maps(model: LevelClassifier, images: torch.Tensor, levels: torch.Tensor, classes: list[int],
                          flip: bool = False) -> np.ndarray:
    """(N, H, W) maps in [0, 1], one per image, of class ``classes[i]`` at level ``levels[i]``; with
    ``flip``, the mean of the image's and its mirror's (mirrored back)."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    wrapper = SingleInput(model).eval()
    out = []
    layer = target_layer(wrapper)
    # Not grad-cam's context manager: its exit prints and swallows an IndexError, which would leave
    # fewer maps than crops; the hooks are released here whatever happens.
    cam = GradCAM(model=wrapper, target_layers=[layer], reshape_transform=channels_first(model.backbone))
    cut = layer.register_forward_pre_hook(gradient_starts_here)
    try:
        with torch.enable_grad(), weights_without_gradients(model):
            for start in range(0, len(images), CAM_BATCH):
                batch = images[start:start + CAM_BATCH]
                wrapper.level = levels[start:start + CAM_BATCH]
                targets = [ClassifierOutputTarget(int(c)) for c in classes[start:start + CAM_BATCH]]
                maps = cam(input_tensor=batch, targets=targets)
                if flip:
                    maps = (maps + cam(input_tensor=batch.flip(-1), targets=targets)[..., ::-1]) / 2
                out.append(np.asarray(maps, dtype=np.float32))
    finally:
        cut.remove()
        cam.activations_and_grads.release()
    return np.concatenate(out) if out else np.zeros((0, *images.shape[-2:]), np.float32)


def heaviest_backbone(blend: Blend) -> str:
    """The backbone with the largest weight in ``blend`` (the first, on a tie)."""
    return blend.backbones[int(np.argmax(blend.weights))]


def evidence_maps(located: LocatedStudy, output_dir: Path, group: str, blend: Blend, grades: dict[tuple[str, str], str],
                  device: torch.device, models: list[FoldModel] | None = None,
                  graded_inputs: dict[PreprocessSettings, dict[int, np.ndarray]] | None = None) -> list[EvidenceMap]:
    """One map per graded crop of ``located`` (a row of its locations), explaining the grade the target
    was given (``grades``: (condition, "L4/L5") -> grade), by the blend's heaviest backbone, averaged
    over its folds. ``models`` and ``graded_inputs``: that backbone's fold models and the images they
    graded (``SplitGrades.models``, ``.inputs``), when grading kept them; else loaded and made again."""
    if located.locations is None or located.locations.empty:
        return []
    name = heaviest_backbone(blend)
    models = models or load_fold_models(output_dir, name, group, device)
    settings = models[0].settings
    models = [m for m in models if m.settings == settings]  # one backbone's folds share their preprocessing
    rows = located.locations.reset_index(drop=True)
    titles = [level_title(lv) for lv in rows["level"]]
    keep = [i for i, (c, t) in enumerate(zip(rows["condition"], titles)) if (c, t) in grades]
    if not keep:
        return []
    rows, titles = rows.iloc[keep].reset_index(drop=True), [titles[i] for i in keep]
    made = (graded_inputs or {}).get(settings, {}).get(located.study_id)
    inputs = made[keep] if made is not None else model_inputs(LocatedStudy(located.study_id, located.stacks, rows), settings)
    images = torch.from_numpy(inputs).to(device)
    levels = torch.tensor([LEVELS.index(lv) for lv in rows["level"]], device=device)
    classes = [SEVERITIES.index(grades[(c, t)]) for c, t in zip(rows["condition"], titles)]
    heat = sum(class_activation_maps(m.model, images, levels, classes, m.test_time_flip) for m in models) / len(models)
    centre = inputs.shape[1] // 2
    return [EvidenceMap(r.condition, t, r.series, int(r.instance_number), int(r.frame), inputs[i, centre], heat[i],
                        grades[(r.condition, t)], name, len(models), settings.input == "full",
                        settings.turn_by_side and CONDITION_SPECS[r.condition].side is not None)
            for i, (r, t) in enumerate(zip(rows.itertuples(), titles))]


def overlay(evidence: EvidenceMap, size: int = 192, alpha: float = 0.45) -> np.ndarray:
    """The crop in grey with its map in colour over it (jet: red where the grade was found), RGB uint8,
    enlarged to ``size`` pixels a side (nearest neighbour: the crop's own pixels stay visible)."""
    from matplotlib import colormaps

    grey = evidence.image.astype(np.float32)[..., None].repeat(3, axis=2) / 255.0
    colour = colormaps["jet"](np.clip(evidence.heat, 0, 1))[..., :3]
    rgb = (1 - alpha) * grey + alpha * colour
    factor = max(1, size // max(rgb.shape[:2]))
    rgb = rgb.repeat(factor, axis=0).repeat(factor, axis=1)
    return (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)


def png_bytes(rgb: np.ndarray) -> bytes:
    """An RGB uint8 array as PNG."""
    import io

    from matplotlib import image as mpimg

    buffer = io.BytesIO()
    mpimg.imsave(buffer, rgb, format="png")
    return buffer.getvalue()


def file_name(evidence: EvidenceMap, taken: set[str]) -> str:
    """``<condition>_<l4_l5>.png``, numbered from ``_2`` when the target was read on more than one crop."""
    stem = f"{evidence.condition}_{evidence.level.replace('/', '_').lower()}"
    name, k = f"{stem}.png", 1
    while name in taken:
        k += 1
        name = f"{stem}_{k}.png"
    taken.add(name)
    return name


def study_evidence(grades: SplitGrades, targets: list[dict], study_id: int, output_dir: Path,
                   device: torch.device) -> dict[str, list[EvidenceMap]]:
    """Group -> the evidence maps of every crop a model graded in that group for one study (``targets``:
    :func:`findings.study_targets`'s; a target given the prior has no map). A group whose maps cannot
    be made is named in the log and left without them."""
    graded = {(t["condition"], t["level"]): t["grade"] for t in targets if t["source"] == "model"}
    out = {}
    for group, located in located_in(grades, study_id).items():
        if located is None or group not in grades.blends:
            continue
        try:
            name = heaviest_backbone(grades.blends[group])
            out[group] = evidence_maps(located, output_dir, group, grades.blends[group], graded, device,
                                       grades.models.get((group, name)), grades.inputs.get((group, name)))
        except SpinegradeError as exc:  # an unreadable slice, a missing model: the grades stand; only this group's maps are lost
            log.warning(f"study {study_id}: no evidence maps for the {group} group ({exc})")
    return out
