"""Training settings: defaults of the published method, a YAML per backbone, command-line overrides.

A backbone is trained once per condition group, so its settings are resolved per group. Precedence,
lowest first: the dataclass defaults below (the published method's); the group's own preprocessing
in the registry (``constants.GROUPS``: whole slice or crop, crop size); ``configs/<name>.yaml``'s top
level; its ``groups: {<group>: {...}}`` section; flags given on the command line (a flag applies to
every group being trained). The resolved settings are saved beside the weights so a run always says
what it did.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from spinegrade.constants import CONDITION_GROUP, GROUPS, flip_keeps_grade
from spinegrade.errors import SpinegradeError
from spinegrade.files import write_text_atomic

# The configs shipped with the package (a link to the repository's configs/, copied into a wheel).
PACKAGE_CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def config_dirs() -> list[Path]:
    """Where a config name is looked up, first match wins: ``./configs/`` of the working directory (the
    competition layout: a user's own configs), then the copies shipped inside the package, so any install
    (editable or not) finds the published configs."""
    dirs = []
    for d in (Path.cwd() / "configs", PACKAGE_CONFIG_DIR):
        if d.is_dir() and all(d.resolve() != seen.resolve() for seen in dirs):
            dirs.append(d)
    return dirs

_TRUE = {"true", "1", "yes", "y", "on", "t"}
_FALSE = {"false", "0", "no", "n", "off", "f"}


def parse_bool(value: Any) -> bool:
    """A real boolean: "False", "false" and "0" mean false (a plain ``bool("False")`` would be true)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise SpinegradeError(f"not a boolean: {value!r} (use true/false, 1/0, yes/no)")


@dataclass
class TrainConfig:
    """Everything a training run depends on. Field names follow the published command's flags."""

    name: str = "convnext"  # the config's name: oof/<name>/, trained_models/<name>/
    backbone: str = "convnext_base.fb_in22k_ft_in1k"  # any timm model name
    pretrained: bool = True
    weights: str | None = None  # local file with the backbone's weights (safetensors or .pth)
    level_embeddings: int = 256
    hidden_sizes: tuple[int, int] = (512, 256)
    dropout: float = 0.1
    freeze_backbone: bool = True
    unfreeze_last_n: int = 32
    input: str = "full"  # "full": the whole slice resized; "crop": a fixed physical size around the point
    crop_mm: float = 48.0
    image_size: int = 224
    batch_size: int = 32
    num_epochs: int = 30
    learning_rate: float = 1e-4
    weight_decay: float = 0.02
    # The loss's class weights: "competition" (1/2/4, the metric's own, what the top teams trained with),
    # "inverse_frequency" or "none".
    class_weights: str = "competition"
    rotation_degrees: float = 15.0
    flip_probability: float = 0.5
    # Training on what a locator gives: the point moved by a Gaussian of this many millimetres
    # (crops only), and a neighbouring slice used this often.
    point_jitter_mm: float = 3.0
    neighbour_slice_probability: float = 0.2
    # The labelled slice and its neighbours read as input channels (odd: 1, 3, 5), in anatomical order.
    slices: int = 1
    # Grade (held-out fold and prediction) as the mean over the image and its horizontal mirror: a
    # test-time augmentation, for a group whose training flips keep the grade.
    test_time_flip: bool = False
    seed: int = 42
    num_workers: int = 2
    # torch.compile the model: "off", "on" (the default inductor backend) or a backend name ("eager",
    # "aot_eager", "inductor", "cudagraphs"). Speed only: results are the same, so it is not part of a
    # fold's identity.
    compile: str = "off"
    # The learning rate's schedule (engine.SCHEDULES): the published method's constant rate.
    lr_schedule: str = "constant"
    # Each fold's sample order and augmentation from seed + fold (True) or from seed (False).
    fold_seeds: bool = False
    # Which epoch a fold keeps (EPOCH_CHOICES): "last", a fixed schedule, so the held-out fold chooses
    # nothing and its predictions are an out-of-fold estimate; or "held_out_best", the epoch that scores
    # best on the held-out fold (an optimistic figure, chosen on the rows it scores).
    epoch_choice: str = "last"
    # A suspect-label list (an evaluation's results/suspect_labels.csv) whose top ``suspect_share`` of
    # labels are left out of the training folds (never out of the held-out fold, which is scored on every
    # label); "" keeps every label.
    suspect_labels: str = ""
    suspect_share: float = 0.05
    # Also log each epoch's curves to Weights & Biases (the wandb package; off by default, never needed).
    wandb: bool = False
    group: str = "spinal"  # the condition group (constants.GROUPS) this model grades
    extra: dict = field(default_factory=dict)  # unknown YAML keys, kept so nothing is silently lost

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["hidden_sizes"] = list(self.hidden_sizes)
        return d


@dataclass
class LocatorConfig:
    """Settings of the level locator (``spinegrade train-localizer``)."""

    backbone: str = "efficientnet_lite0"
    pretrained: bool = True
    weights: str | None = None
    image_size: int = 256  # side of the square input: a fixed field in mm around the sagittal slice
    batch_size: int = 8
    num_epochs: int = 20
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 42
    num_workers: int = 0
    # What the engine does for every model kind (engine.py); the locators' own defaults.
    lr_schedule: str = "onecycle"
    fold_seeds: bool = True
    compile: str = "off"
    epoch_choice: str = "last"  # as TrainConfig's
    wandb: bool = False

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


LR_SCHEDULES = ("constant", "onecycle")  # engine.make_schedule
EPOCH_CHOICES = ("last", "held_out_best")  # fold_loop.fit
CALIBRATIONS = ("auto", "none", "temperature", "full")  # blend.run_blend: "auto" chooses among the others
# Settings whose default changed: a fold saved before a setting existed was trained with this value, so
# it reads as saved with it (and is trained again under the new default, never passed off as one).
FORMER_DEFAULTS = {"epoch_choice": "held_out_best"}
_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_BOOL_FIELDS = {"pretrained", "freeze_backbone", "test_time_flip", "fold_seeds", "wandb"}
# Settings of how a run goes, not of what it learns: left out of a fold's identity, so changing them
# never retrains a finished fold.
RUN_ONLY = ("num_workers", "compile", "wandb")


def _coerce(key: str, value: Any) -> Any:
    if value is None:
        return None
    if key in _BOOL_FIELDS:
        return parse_bool(value)
    default = getattr(TrainConfig(), key)
    try:
        if key == "hidden_sizes":
            return tuple(int(v) for v in value)
        if isinstance(default, bool):
            return parse_bool(value)
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
    except (TypeError, ValueError):
        raise SpinegradeError(f"setting {key}: {value!r} is not a valid {type(default).__name__}") from None
    return value


def available_configs(config_dir: Path | None = None) -> list[str]:
    dirs = [config_dir] if config_dir is not None else config_dirs()
    return sorted({p.stem for d in dirs for p in d.glob("*.yaml")})


def _read_yaml(path: Path) -> dict:
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise SpinegradeError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(values, dict):
        raise SpinegradeError(f"{path}: expected a mapping of settings")
    if "condition" in values:  # before condition groups: `condition: spinal_canal_stenosis`
        condition = values.pop("condition")
        if condition not in CONDITION_GROUP:
            raise SpinegradeError(f"{path}: condition must be one of {', '.join(CONDITION_GROUP)}, got {condition!r}")
        values.setdefault("group", CONDITION_GROUP[condition])
    return values


def config_path(name_or_path: str, config_dir: Path | None = None) -> Path:
    """A YAML file as given, or the first ``<name>.yaml`` of ``config_dir`` (default: :func:`config_dirs`)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if path.is_file():
            return path
        searched = [path]
    else:
        searched = [d / f"{name_or_path}.yaml" for d in ([config_dir] if config_dir is not None else config_dirs())]
        for candidate in searched:
            if candidate.is_file():
                return candidate
    where = ", ".join(str(p) for p in searched) or "no configs/ folder here or in the package"
    raise SpinegradeError(
        f"no config {name_or_path!r} ({where}); available: {', '.join(available_configs(config_dir)) or 'none'}"
    )


def config_group(name_or_path: str, config_dir: Path | None = None) -> str:
    """The group a config names (``group:``, or a pre-group ``condition:``); spinal when it names none."""
    return _read_yaml(config_path(name_or_path, config_dir)).get("group", "spinal")


def load_config(name_or_path: str, overrides: dict[str, Any] | None = None, config_dir: Path | None = None,
                group: str | None = None) -> TrainConfig:
    """``name_or_path``: a config name in ``configs/`` or a YAML file, resolved for ``group`` (default:
    the group the YAML names, else spinal); ``overrides`` (flags) win over everything."""
    path = config_path(name_or_path, config_dir)
    file_values = _read_yaml(path)
    sections = file_values.pop("groups", None) or {}
    if not isinstance(sections, dict) or any(not isinstance(v, dict) for v in sections.values()):
        raise SpinegradeError(f"{path}: `groups:` must map group names to settings, e.g. groups: {{foraminal: {{crop_mm: 40}}}}")
    unknown_groups = sorted(set(sections) - set(GROUPS))
    if unknown_groups:
        raise SpinegradeError(f"{path}: unknown group(s) under `groups:` {', '.join(unknown_groups)}; known: {', '.join(GROUPS)}")
    group = group or (overrides or {}).get("group") or file_values.get("group") or "spinal"
    if group not in GROUPS:
        raise SpinegradeError(f"{path}: group must be one of {', '.join(GROUPS)}, got {group!r}")
    registry = GROUPS[group]
    values: dict[str, Any] = {"input": registry.input, "crop_mm": registry.crop_mm, "slices": registry.slices,
                              "test_time_flip": registry.test_time_flip}
    if registry.turn_by_side:  # its crops keep one orientation: a horizontal flip would undo it (YAML or a flag may)
        values["flip_probability"] = 0.0
    values.update(file_values)
    values.update(sections.get(group, {}))
    values.setdefault("name", path.stem)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    values["group"] = group
    extra = dict(values.pop("extra", None) or {})
    unknown = sorted(k for k in values if k not in _FIELDS)
    if unknown:
        raise SpinegradeError(f"{path}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(_FIELDS))} "
                              "(put free-form notes under `extra:`)")
    config = TrainConfig(**{k: _coerce(k, v) for k, v in values.items()}, extra=extra)
    if config.input not in ("full", "crop"):
        raise SpinegradeError(f"{path}: input must be 'full' or 'crop', got {config.input!r}")
    if config.input == "full" and GROUPS[config.group].turn_by_side:
        raise SpinegradeError(f"{path}: the {config.group} group grades each side on one axial slice; a whole slice "
                              "(input: full) shows both sides alike, so its model could not tell left from right: "
                              "use input: crop")
    if config.class_weights not in ("inverse_frequency", "competition", "none"):
        raise SpinegradeError(f"{path}: class_weights must be inverse_frequency, competition or none")
    if config.slices < 1 or config.slices % 2 != 1:
        raise SpinegradeError(f"{path}: slices must be an odd number (1, 3, 5), got {config.slices}")
    if config.test_time_flip and (config.flip_probability <= 0 or not flip_keeps_grade(group, config.input)):
        raise SpinegradeError(f"{path}: test_time_flip needs a model trained with flips that keep the grade "
                              f"({group}: flip_probability {config.flip_probability}, input {config.input})")
    if config.lr_schedule not in LR_SCHEDULES:
        raise SpinegradeError(f"{path}: lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {config.lr_schedule!r}")
    if config.epoch_choice not in EPOCH_CHOICES:
        raise SpinegradeError(f"{path}: epoch_choice must be one of {', '.join(EPOCH_CHOICES)}, got {config.epoch_choice!r}")
    if not 0 < config.suspect_share < 1:
        raise SpinegradeError(f"{path}: suspect_share must be between 0 and 1, got {config.suspect_share}")
    if len(config.hidden_sizes) != 2:
        raise SpinegradeError(f"{path}: hidden_sizes must be two numbers, got {list(config.hidden_sizes)}")
    return config


def save_config(config: TrainConfig, path: str | Path) -> None:
    write_text_atomic(path, yaml.safe_dump(config.to_dict(), sort_keys=False))
