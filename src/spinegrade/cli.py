"""Command line: thin argument parsing over the package's functions.

User errors (:class:`SpinegradeError`) print one line and exit with status 2; nothing here
holds logic a test or notebook would need, so they call the same functions directly. Output goes
through the ``spinegrade`` logger (``--quiet``: warnings, errors and the final result tables only;
``--verbose``: everything), and a command that works in an output folder also appends its log to
``OUTPUT/spinegrade.log``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from spinegrade.config import CALIBRATIONS
from spinegrade.constants import COMPETITION, GROUPS, check_groups
from spinegrade.errors import SpinegradeError
from spinegrade.layout import RunLayout
from spinegrade.logs import get_logger, log_to_file, reset_logging, result, setup_logging

log = get_logger("spinegrade.cli")

DEFAULT_DATA_DIR = Path("input") / COMPETITION
DEFAULT_FOLDS = Path("input") / "folds.csv"


def cmd_synth(args: argparse.Namespace) -> None:
    from spinegrade.data.synthetic import SynthSettings, write_dataset

    settings = SynthSettings(studies=args.studies, test_studies=args.test_studies, seed=args.seed,
                             image_size=tuple(args.image_size), workers=args.workers, straight=args.straight,
                             clean_grades=args.clean_grades, multiframe=args.multiframe)
    info = write_dataset(args.dir, settings, answers_dir=args.answers_dir)
    print(f"wrote {info['train_studies']} training and {info['test_studies']} test studies to {info['data_dir']}")
    print(f"test labels (for scoring only) in {info['answers_dir']}")


def cmd_index(args: argparse.Namespace) -> None:
    from spinegrade.data.index import build_index, format_report

    index = build_index(args.data_dir, split=args.split, check_images=not args.csv_only,
                        decode_pixels=args.decode_pixels)
    print(format_report(index, examples=args.examples))
    if args.out:
        from spinegrade.data.folds import write_csv_atomic

        write_csv_atomic(index.table, args.out)
        print(f"tidy table written to {args.out}")


def cmd_folds(args: argparse.Namespace) -> None:
    from spinegrade.data.folds import fold_summary, make_folds, write_csv_atomic
    from spinegrade.data.index import build_index

    index = build_index(args.data_dir, check_images=False)
    labels = index.labels_wide()
    folds = make_folds(labels, n_folds=args.n_folds, seed=args.seed)
    write_csv_atomic(folds, args.out)
    print(f"{args.n_folds} folds over {len(folds)} studies written to {args.out}")
    print(fold_summary(folds, labels))


def cmd_download(args: argparse.Namespace) -> None:
    from spinegrade.download import download_competition

    target = download_competition(args.dest)
    print(f"competition data in {target}")


# Settings a training run takes from the command line, with the published command's spellings;
# dashed spellings (--batch-size) work too. None means "as in the config".
TRAIN_OVERRIDES: list[tuple[str, type, str]] = [
    ("batch_size", int, "samples per batch (32)"),
    ("num_epochs", int, "epochs (30)"),
    ("learning_rate", float, "AdamW learning rate (1e-4)"),
    ("weight_decay", float, "AdamW weight decay (0.02)"),
    ("level_embeddings", int, "size of the level embedding (256)"),
    ("freeze_backbone", str, "freeze the backbone: true/false (true)"),
    ("unfreeze_last_n", int, "backbone parameter tensors trained again when frozen (32)"),
    ("image_size", int, "model input size in pixels (224)"),
    ("input", str, "full: whole slice resized; crop: crop_mm around the point"),
    ("crop_mm", float, "crop size in millimetres (48)"),
    ("pretrained", str, "start from ImageNet weights: true/false (true)"),
    ("weights", str, "local backbone weights file (safetensors or .pth)"),
    ("seed", int, "random seed (42)"),
    ("class_weights", str, "competition (1/2/4, the default), inverse_frequency or none"),
    ("epoch_choice", str, "the epoch a fold keeps: last (a fixed schedule: an honest OOF) or held_out_best (optimistic)"),
    ("suspect_labels", str, "a suspect-label list (results/suspect_labels.csv of an evaluation): its top share of "
                            "labels left out of the training folds"),
    ("suspect_share", float, "the share of the suspect-label list left out (0.05)"),
    ("num_workers", int, "data loader worker processes"),
    ("compile", str, "torch.compile the model: off, on, or a backend (eager, aot_eager, inductor)"),
    ("point_jitter_mm", float, "training shift of the point, standard deviation in mm (3)"),
    ("neighbour_slice_probability", float, "how often training moves the slices read by one (0.2)"),
    ("slices", int, "the labelled slice and its neighbours as input channels: 1, 3 or 5 (the group's default)"),
    ("flip_probability", float, "how often training flips an image horizontally (0.5; 0 for the turned recess crops)"),
    ("test_time_flip", str, "grade as the mean over the image and its mirror: true/false (the group's default)"),
    ("lr_schedule", str, "the learning rate's schedule: constant (the method's) or onecycle"),
    ("fold_seeds", str, "each fold's sample order and augmentation from seed + fold: true/false (false)"),
    ("backbone", str, "timm model name, overriding the config's"),
]


def trained_groups(conditions: list[str] | None) -> list[str]:
    """``--conditions`` checked; by default every group with a locator (a group without one could be
    trained on its labelled points but never predicted, so it is trained only when asked for)."""
    if conditions:
        return check_groups(conditions)
    return [g for g, spec in GROUPS.items() if spec.locator is not None]


def cmd_train(args: argparse.Namespace) -> None:
    from spinegrade.config import load_config
    from spinegrade.data.folds import read_folds

    overrides = {name: getattr(args, name) for name, _, _ in TRAIN_OVERRIDES}
    overrides["wandb"] = args.wandb
    groups = trained_groups(args.conditions)
    # fail early on any bad name or setting, for every (backbone, group)
    configs = [load_config(name, overrides, group=group) for name in args.models for group in groups]
    if any(c.wandb for c in configs):
        from spinegrade.fold_loop import require_wandb

        require_wandb()  # now, not after the data is cached
    from spinegrade.distributed import check_request, launch, world_from_environment  # heavy: settings are good

    check_request(args.devices, args.num_nodes, args.strategy)
    from spinegrade.train import finished_folds, train_folds

    folds = args.fold if args.fold is not None else sorted(int(f) for f in read_folds(args.folds)["fold"].unique())
    launch(train_folds, (configs, folds, args.data_dir, args.folds, args.output_dir, args.resume, args.force,
                         args.device), args.devices, args.num_nodes, args.strategy)
    if not world_from_environment().is_main:
        return
    lines = ["", "name                 group         fold  best epoch  held-out loss  class prior"]
    for r in finished_folds(args.output_dir, configs, folds):
        lines.append(f"{r['name']:20s} {r['group']:12s} {r['fold']:5d}  {r['best_epoch'] + 1:10d}  "
                     f"{r['best_score']:13.4f}  {r['prior_score']:11.4f}")
    from spinegrade.evaluate import format_scores, oof_scores
    from spinegrade.oof import read_oof

    for config in configs:
        oof = read_oof(RunLayout(args.output_dir), config.name, config.group)
        if not oof.empty:
            lines.append(format_scores(config.name, config.group, oof_scores(oof)))
    result(log, "\n".join(lines))


def cmd_train_locators(args: argparse.Namespace) -> None:
    from spinegrade.config import EPOCH_CHOICES, LR_SCHEDULES, LocatorConfig, parse_bool

    config = LocatorConfig()
    for name in ("backbone", "image_size", "batch_size", "num_epochs", "learning_rate", "seed", "num_workers", "weights",
                 "lr_schedule", "compile", "epoch_choice"):
        if getattr(args, name) is not None:
            setattr(config, name, getattr(args, name))
    config.wandb = bool(args.wandb)
    if config.wandb:
        from spinegrade.fold_loop import require_wandb

        require_wandb()
    for name in ("pretrained", "fold_seeds"):
        if getattr(args, name) is not None:
            setattr(config, name, parse_bool(getattr(args, name)))
    if config.lr_schedule not in LR_SCHEDULES:
        raise SpinegradeError(f"--lr_schedule {config.lr_schedule}: use one of {', '.join(LR_SCHEDULES)}")
    if config.epoch_choice not in EPOCH_CHOICES:
        raise SpinegradeError(f"--epoch_choice {config.epoch_choice}: use one of {', '.join(EPOCH_CHOICES)}")
    from spinegrade.locators import locator_trained, train_locator

    for group in trained_groups(args.conditions):
        locator = GROUPS[group].locator
        if args.resume and not args.force and locator is not None and locator_trained(args.output_dir, group):
            log.info(f"{group}: locator already trained in {RunLayout(args.output_dir).locator_dir(group)}; "
                     "use --force to retrain")
            continue
        train_locator(group, config, args.data_dir, args.folds, args.output_dir, device=args.device, resume=args.resume,
                      force=args.force, head=not args.offsets_only)


def cmd_predict(args: argparse.Namespace) -> None:
    if args.study_dir is not None:
        from spinegrade.study_page import predict_study

        predict_study(args.study_dir, args.output_dir, args.backbones, out_dir=args.out, device=args.device,
                      evidence=not args.no_evidence)
        return
    from spinegrade.submit import predict_split

    reports = RunLayout(args.output_dir).structured_reports(args.split) if args.sr else None
    predict_split(args.data_dir, args.split, args.output_dir, args.backbones, out=args.out, device=args.device,
                  structured_reports=reports)


def cmd_blend(args: argparse.Namespace) -> None:
    from spinegrade.blend import run_blend

    run_blend(args.output_dir, args.folds, calibration=args.calibration)


def cmd_submit(args: argparse.Namespace) -> None:
    from spinegrade.submit import submit

    submit(args.data_dir, args.output_dir, description=args.description, device=args.device)


def cmd_score(args: argparse.Namespace) -> None:
    from spinegrade.metrics import competition_score, study_bootstrap
    from spinegrade.submit import score_submission, scored_rows

    rows = scored_rows(args.submission, args.labels)
    scores, interval = competition_score(rows), study_bootstrap(rows)
    lines = [f"{args.submission} against {args.labels} ({rows['study_id'].nunique()} studies; 90 % study-bootstrap "
             "interval in brackets):",
             "  submission   " + "  ".join(f"{k} {v:.4f} [{interval[k][0]:.3f}, {interval[k][1]:.3f}]"
                                          for k, v in scores.items())]
    if args.data_dir is not None:
        import pandas as pd

        from spinegrade.submit import prior_submission

        prior = prior_submission(pd.read_csv(args.submission)["row_id"], args.data_dir, args.output_dir)
        base = score_submission(prior, args.labels)
        lines.append("  class prior  " + "  ".join(f"{k} {v:.4f}" for k, v in base.items()))
    result(log, "\n".join(lines))


def cmd_kernel(args: argparse.Namespace) -> None:
    from spinegrade.kernel.build import build_kernel

    build = build_kernel(args.output_dir, args.kernels_dir, name=args.name, username=args.username,
                         wheelhouse=args.wheelhouse, offline=args.offline, folds_per_model=args.folds_per_model)
    print(f"kernel ready in {build.kernel_dir}: rehearse it with `spinegrade kernel-run`, send it with `make upload`")


def cmd_kernel_run(args: argparse.Namespace) -> None:
    from spinegrade.kernel.local import run_kernel_locally

    kernels_dir = args.kernels_dir or RunLayout(args.output_dir).kernels
    root = args.work_dir or args.output_dir / "kernel-run"
    submission, seconds = run_kernel_locally(kernels_dir / args.name, args.data_dir, root,
                                             python=args.python)
    result(log, f"kernel finished in {seconds:.1f} s: {submission}")


def cmd_upload(args: argparse.Namespace) -> None:
    from spinegrade.kernel.upload import upload

    kernels_dir = args.kernels_dir or RunLayout(args.output_dir).kernels
    upload(kernels_dir, name=args.name, message=args.message, dry_run=args.dry_run)


def cmd_evaluate(args: argparse.Namespace) -> None:
    from spinegrade.evaluate import format_competition, format_summary, run_evaluation

    data_dir = args.data_dir if args.data_dir.is_dir() else None
    summary = run_evaluation(args.output_dir, args.folds, data_dir=data_dir)
    import pandas as pd

    competition = pd.read_csv(RunLayout(args.output_dir).results / "competition.csv")
    result(log, format_summary(summary) + "\n" + format_competition(competition))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spinegrade", description=__doc__.splitlines()[0])
    parser.add_argument("--quiet", "-q", action="store_true", help="only warnings, errors and the final results")
    parser.add_argument("--verbose", "-v", action="store_true", help="debug lines too")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write a synthetic dataset in the RSNA layout (real DICOM files)")
    p.add_argument("dir", type=Path, nargs="?", default=DEFAULT_DATA_DIR)
    p.add_argument("--studies", type=int, default=40)
    p.add_argument("--test-studies", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, nargs=2, default=(256, 384), metavar=("MIN", "MAX"),
                   help="image sizes are drawn per series between these (pixels)")
    p.add_argument("--workers", type=int, default=0, help="processes (0: one per core)")
    p.add_argument("--straight", action="store_true",
                   help="spines straight and centred (no offset, lean, curve or rotation); otherwise the same studies")
    p.add_argument("--clean-grades", action="store_true",
                   help="no rater noise and no wrong labels (every image shows its graded narrowing); otherwise "
                        "the same studies and joint grades")
    p.add_argument("--multiframe", action="store_true",
                   help="each test series stored as one Enhanced MR Image file (the training split keeps one file per "
                        "slice: its labels name instance files)")
    p.add_argument("--answers-dir", type=Path, default=None,
                   help="where the test split's labels and every label's image narrowing go (default: <dir>-answers)")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("index", help="read the CSVs into a tidy table and print the data report")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    p.add_argument("--split", choices=["train", "test"], default="train")
    p.add_argument("--csv-only", action="store_true", help="do not look at the image files")
    p.add_argument("--decode-pixels", action="store_true", help="decode every image of the listed series, not just its header")
    p.add_argument("--examples", type=int, default=5, help="examples shown per kind of problem")
    p.add_argument("--out", type=Path, default=None, help="also write the tidy table as CSV")
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("folds", help="patient-grouped multilabel-stratified K folds")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    p.add_argument("--n-folds", type=int, default=5)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", type=Path, default=DEFAULT_FOLDS)
    p.set_defaults(func=cmd_folds)

    p = sub.add_parser("train", help="train backbones fold by fold; out-of-fold predictions to OUTPUT/oof/")
    p.add_argument("--models", "--model", nargs="+", required=True, help="config names in configs/ (or YAML files)")
    p.add_argument("--conditions", nargs="+", default=None, metavar="GROUP",
                   help=f"condition groups to train: {', '.join(GROUPS)} (default: every group with a locator)")
    p.add_argument("--fold", type=int, nargs="+", default=None, help="fold(s) to train (default: every fold)")
    p.add_argument("--data-dir", "--data_dir", type=Path, default=DEFAULT_DATA_DIR)
    p.add_argument("--folds", type=Path, default=DEFAULT_FOLDS)
    p.add_argument("--output-dir", "--output_dir", type=Path, default=Path("."),
                   help="where trained_models/, oof/, cache/ go (default: here)")
    p.add_argument("--resume", action="store_true", help="continue each fold from its last checkpoint")
    p.add_argument("--force", action="store_true", help="retrain folds already finished")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--devices", type=int, default=1, help="processes (GPUs) on this machine, data-parallel (DDP)")
    p.add_argument("--num_nodes", "--num-nodes", dest="num_nodes", type=int, default=1,
                   help="machines; each runs its own processes under torchrun or srun (scripts/slurm/)")
    p.add_argument("--strategy", default="auto", help="auto or ddp (torch.distributed; gloo on CPU, NCCL on GPU)")
    for name, kind, help_text in TRAIN_OVERRIDES:
        p.add_argument(f"--{name}", f"--{name.replace('_', '-')}", dest=name, type=kind, default=None, help=help_text)
    p.add_argument("--wandb", action=argparse.BooleanOptionalAction, default=None,
                   help="also log each fold's curves to Weights & Biases (needs the wandb package; WANDB_MODE=offline keeps them local)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("train-localizer", help="train each condition group's locator fold by fold; out-of-fold report")
    p.add_argument("--conditions", nargs="+", default=None, metavar="GROUP",
                   help="condition groups whose locators to train (default: every group with a locator)")
    p.add_argument("--data-dir", "--data_dir", type=Path, default=DEFAULT_DATA_DIR)
    p.add_argument("--folds", type=Path, default=DEFAULT_FOLDS)
    p.add_argument("--output-dir", "--output_dir", type=Path, default=Path("."))
    p.add_argument("--device", default=None)
    p.add_argument("--resume", action="store_true",
                   help="keep a finished locator; continue an unfinished fold from its last checkpoint")
    p.add_argument("--force", action="store_true", help="retrain locators and folds already finished")
    p.add_argument("--offsets-only", action="store_true",
                   help="the foramina and lateral recesses at their learned offsets from the canal alone, no slice "
                        "locator (for comparison)")
    for name, kind in (("backbone", str), ("image_size", int), ("batch_size", int), ("num_epochs", int),
                       ("learning_rate", float), ("seed", int), ("num_workers", int), ("weights", str),
                       ("pretrained", str), ("lr_schedule", str), ("fold_seeds", str), ("compile", str),
                       ("epoch_choice", str)):
        p.add_argument(f"--{name}", f"--{name.replace('_', '-')}", dest=name, type=kind, default=None)
    p.add_argument("--wandb", action=argparse.BooleanOptionalAction, default=False, help="also log each fold's curves to Weights & Biases (needs the wandb package; WANDB_MODE=offline keeps them local)")
    p.set_defaults(func=cmd_train_locators)

    p = sub.add_parser("predict", help="grade a split (locate, then every fold model) or one study folder")
    p.add_argument("study_dir", type=Path, nargs="?", default=None,
                   help="one study's DICOM files, any names and nesting (instead of --split)")
    p.add_argument("--data-dir", "--data_dir", type=Path, default=DEFAULT_DATA_DIR)
    p.add_argument("--split", choices=["test", "train"], default="test")
    p.add_argument("--output-dir", "--output_dir", type=Path, default=Path("."), help="where trained_models/ is")
    p.add_argument("--backbones", nargs="+", default=None, help="default: every trained backbone")
    p.add_argument("--out", type=Path, default=None,
                   help="submission CSV (split) or output folder (study); default under OUTPUT/ or beside the study")
    p.add_argument("--sr", action="store_true",
                   help="a split: also one DICOM Structured Report per study, OUTPUT/predictions/<split>_sr/<study_id>.dcm "
                        "(a study folder always gets its grades-sr.dcm)")
    p.add_argument("--no-evidence", "--no_evidence", dest="no_evidence", action="store_true",
                   help="a study folder: leave out the evidence maps (Grad-CAM per graded crop, on by default)")
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("blend", help="blend weights tuned on OOF loss per group, with a nested estimate; oof/blend.json")
    p.add_argument("--output-dir", "--output_dir", type=Path, default=Path("."))
    p.add_argument("--folds", type=Path, default=None, help="default: the copy the run made at training (OUTPUT/folds.csv)")
    p.add_argument("--calibration", choices=list(CALIBRATIONS), default="auto",
                   help="fitted beside the weights: none, temperature, full (a temperature, a scale per grade and the "
                        "spinal group's factor on each study's highest Severe probability), or auto (default: the one "
                        "with the lowest leave-one-fold-out loss, each fold's chosen without it)")
    p.add_argument("--temperature", dest="calibration", action="store_const", const="temperature",
                   help="the same as --calibration temperature")
    p.set_defaults(func=cmd_blend)

    p = sub.add_parser("submit", help="predict the test split with the blend; submissions/ and a manifest")
    p.add_argument("--data-dir", "--data_dir", type=Path, default=DEFAULT_DATA_DIR)
    p.add_argument("--output-dir", "--output_dir", type=Path, default=Path("."))
    p.add_argument("--description", default="blend", help="short description in the file name")
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("score", help="score a submission against known labels (a synthetic set's answers)")
    p.add_argument("submission", type=Path)
    p.add_argument("--labels", type=Path, required=True, help="labels in train.csv's format")
    p.add_argument("--data-dir", "--data_dir", type=Path, default=None,
                   help="also score the weight-scaled training prior of this dataset on the same rows")
    p.add_argument("--output-dir", "--output_dir", type=Path, default=Path("."))
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("evaluate", help="OOF metrics, confusion matrices, plots and report.html for every backbone and group")
    p.add_argument("--output-dir", "--output_dir", type=Path, default=Path("."))
    p.add_argument("--folds", type=Path, default=None, help="default: the copy the run made at training (OUTPUT/folds.csv)")
    p.add_argument("--data-dir", "--data_dir", type=Path, default=DEFAULT_DATA_DIR,
                   help="for the data report and example images (skipped when absent)")
    p.set_defaults(func=cmd_evaluate)

    from spinegrade.kernel import DEFAULT_NAME

    p = sub.add_parser("kernel", help="build the offline Kaggle kernel of the blend and the datasets it mounts")
    p.add_argument("--output-dir", "--output_dir", type=Path, default=Path("."), help="where trained_models/ and oof/ are")
    p.add_argument("--kernels-dir", type=Path, default=None, help="default: OUTPUT/kernels")
    p.add_argument("--name", default=DEFAULT_NAME, help="kernel slug; the datasets are NAME-code and NAME-models")
    p.add_argument("--username", default=None, help="Kaggle user owning it (default: KAGGLE_USERNAME or kaggle.json)")
    p.add_argument("--wheelhouse", type=Path, default=None,
                   help="folder of dependency wheels to use first (default: KERNELS/wheelhouse, filled by downloads)")
    p.add_argument("--offline", action="store_true",
                   help="never download wheels: pack missing ones from this environment (this Python only)")
    p.add_argument("--folds-per-model", type=int, default=None,
                   help="keep the first K folds of each backbone and group (default: all): the cut that fits the "
                        "competition's 9 hours (benchmarks/kernel_budget.py says which K)")
    p.set_defaults(func=cmd_kernel)

    p = sub.add_parser("kernel-run", help="rehearse the built kernel here: Kaggle-like environment, no network")
    p.add_argument("--data-dir", "--data_dir", type=Path, default=DEFAULT_DATA_DIR, help="mounted as the competition")
    p.add_argument("--output-dir", "--output_dir", type=Path, default=Path("."))
    p.add_argument("--kernels-dir", type=Path, default=None, help="default: OUTPUT/kernels")
    p.add_argument("--name", default=DEFAULT_NAME)
    p.add_argument("--work-dir", type=Path, default=None, help="input/, working/ and env/ go here (default: OUTPUT/kernel-run)")
    p.add_argument("--python", type=Path, default=None, help="run with this interpreter instead of a Kaggle-like environment")
    p.set_defaults(func=cmd_kernel_run)

    p = sub.add_parser("upload", help="create or version the kernel's datasets and push the kernel (kaggle command)")
    p.add_argument("--output-dir", "--output_dir", type=Path, default=Path("."))
    p.add_argument("--kernels-dir", type=Path, default=None, help="default: OUTPUT/kernels")
    p.add_argument("--name", default=DEFAULT_NAME)
    p.add_argument("--message", default="spinegrade kernel", help="dataset version message")
    p.add_argument("--dry-run", action="store_true", help="print the kaggle commands, run nothing")
    p.set_defaults(func=cmd_upload)

    p = sub.add_parser("download", help="download the competition data with the kaggle command")
    p.add_argument("--dest", type=Path, default=Path("input"))
    p.set_defaults(func=cmd_download)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Under torchrun or srun every rank runs this: only rank 0 says more than warnings.
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) or 0)
    level_before = logging.getLogger("spinegrade").level
    setup_logging(quiet=args.quiet or rank != 0, verbose=args.verbose and rank == 0)
    try:
        output_dir = getattr(args, "output_dir", None)
        if output_dir is not None and args.command not in ("score", "kernel-run", "upload"):
            log_to_file(Path(output_dir) / "spinegrade.log")
        args.func(args)
    except SpinegradeError as exc:
        log.error(f"spinegrade {args.command}: error: {exc}")
        return 2
    except KeyboardInterrupt:
        log.error(f"spinegrade {args.command}: interrupted")
        return 130
    finally:
        reset_logging(level_before)
    return 0


if __name__ == "__main__":
    sys.exit(main())
