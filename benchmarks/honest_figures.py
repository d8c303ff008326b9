"""Do the out-of-fold figures predict the test score? A benchmark set with noisy grades, measured end to end.

On a synthetic set of ``--studies`` training and ``--test-studies`` test studies (rater noise and wrong
labels, as ``make demo``'s), with ``--folds`` patient-grouped folds:

1. every group's locator is trained once (the demo's settings) and shared by every grading run below;
2. EfficientNet-Lite0 grades each group, once per class weighting (the metric's 1:2:4 and inverse
   frequency) and seed (``--seeds``), every fold keeping its last epoch; each run's OOF terms at the
   labelled points are scored uncalibrated, with the full calibration (``blend --calibration full``: a
   temperature, a scale per grade and the spinal group's study-level Severe factor, fitted on the other
   folds) and with the default (``auto``: each fold's calibration chosen by an inner split of the others);
3. the first run (the first weighting, 1:2:4, and the first seed) is blended (the default), evaluated end to end (each
   training study located by its fold's locators) and submitted on the test split: each term's test
   score beside the out-of-fold estimate's 90 % study-bootstrap interval, at the labelled points and
   located, and each term's gap to the oracle (``benchmarks/oracle.py``'s reader of the image);
4. its suspect-label list (``label_noise``) against the generator's wrong labels: the share of each kind
   in the top 5 %, beside a random list's 5 %.

Everything is written under ``--root`` (outside the repository by default) and resumes where it stopped.

    python benchmarks/honest_figures.py [--root ../honest-run] [--studies 150 --test-studies 150]
        [--seeds 42 43 44] [--weightings competition inverse_frequency] [--epochs N]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

from common import report
from spinegrade import oracle
from spinegrade.blend import aligned_oof, nested_loss, recipes
from spinegrade.cli import main as spinegrade
from spinegrade.constants import GROUPS, PROBABILITY_COLUMNS
from spinegrade.data.folds import read_folds
from spinegrade.label_noise import recall_of, suspect_labels
from spinegrade.layout import BLEND_NAME, RunLayout
from spinegrade.metrics import competition_score, study_bootstrap
from spinegrade.oof import parsed, read_oof
from spinegrade.submit import scored_rows

ROOT = Path(__file__).resolve().parents[1]
BACKBONE = "efficientnet_lite0"
GRADING = {"spinal": ["--num_epochs", "5"], "foraminal": ["--num_epochs", "4", "--image_size", "96"],
           "subarticular": ["--num_epochs", "4", "--image_size", "96"]}  # make demo's
LOCATING = ["--image_size", "64", "--num_epochs", "12", "--batch_size", "8"]
TERMS = ["spinal", "foraminal", "subarticular", "any_severe_spinal", "score"]


def run(*args: str) -> None:
    code = spinegrade(["--quiet", *args])
    if code:
        raise SystemExit(f"spinegrade {' '.join(args)} exited {code}")


def labelled_terms(out: Path, calibration: str) -> dict[str, float]:
    """The run's OOF terms at the labelled points over every group, each group's rows calibrated
    (``calibration``, :data:`spinegrade.config.CALIBRATIONS`) per fold on the other folds (nested)."""
    layout, frames = RunLayout(out), []
    for group in GROUPS:
        if not layout.finished_fold_dirs(BACKBONE, group):
            continue
        frame, per_backbone = aligned_oof(layout, [BACKBONE], group)
        if calibration != "none":
            _, probs, _ = nested_loss(frame, per_backbone, [BACKBONE], recipes(1, calibration))
            frame = frame.assign(**{c: probs[:, k] for k, c in enumerate(PROBABILITY_COLUMNS)})
        frames.append(frame)
    return competition_score(pd.concat(frames, ignore_index=True))


def with_interval(frame: pd.DataFrame, resamples: int) -> dict:
    point, interval = competition_score(frame), study_bootstrap(frame, resamples)
    return {t: {"value": point[t], "interval": list(interval[t])} for t in point}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=ROOT.parent / "honest-run")
    parser.add_argument("--studies", type=int, default=150)
    parser.add_argument("--test-studies", type=int, default=150)
    parser.add_argument("--image-size", type=int, nargs=2, default=(128, 192))
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    parser.add_argument("--seed", type=int, default=5, help="the synthetic set's seed")
    parser.add_argument("--weightings", nargs="+", default=["competition", "inverse_frequency"])
    parser.add_argument("--epochs", type=int, default=None, help="every model's epochs (default: make demo's)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="study-bootstrap resamples")
    parser.add_argument("--groups", nargs="+", default=list(GRADING), choices=list(GRADING),
                        help="the condition groups measured (default: all three)")
    args = parser.parse_args()
    grading = {g: [*f, *(["--num_epochs", str(args.epochs)] if args.epochs else [])] for g, f in GRADING.items()
               if g in args.groups}
    locating = [*LOCATING, *(["--num_epochs", str(args.epochs)] if args.epochs else [])]
    root = args.root
    data, folds_csv = root / "data", root / "folds.csv"
    answers = root / "data-answers"
    started, timings = time.perf_counter(), {}
    if not (data / "train.csv").is_file():
        run("synth", str(data), "--studies", str(args.studies), "--test-studies", str(args.test_studies),
            "--image-size", *map(str, args.image_size), "--seed", str(args.seed))
    run("folds", "--data-dir", str(data), "--n-folds", str(args.folds), "--out", str(folds_csv))
    folds = sorted(read_folds(folds_csv)["fold"].unique().tolist())
    timings["data"] = time.perf_counter() - started
    locators = root / "locators"
    run("train-localizer", "--data-dir", str(data), "--folds", str(folds_csv), "--output-dir", str(locators),
        "--resume", "--conditions", *args.groups, *locating)
    timings["locators"] = time.perf_counter() - started - sum(timings.values())

    variants = {}
    for weights in args.weightings:
        for seed in args.seeds:
            out = root / f"{weights}-seed{seed}"
            (out / "trained_models").mkdir(parents=True, exist_ok=True)
            shared = out / "trained_models" / "localizer"
            if not shared.exists():
                os.symlink((locators / "trained_models" / "localizer").resolve(), shared)
            for group, flags in grading.items():
                run("train", "--models", BACKBONE, "--conditions", group, "--data-dir", str(data), "--folds",
                    str(folds_csv), "--output-dir", str(out), "--resume", "--class_weights", weights, "--seed",
                    str(seed), *flags)
            variants[f"{weights}, seed {seed}"] = {
                c: labelled_terms(out, c) for c in ("none", "full", "auto")}
    timings["grading"] = time.perf_counter() - started - sum(timings.values())

    main_run = root / f"{args.weightings[0]}-seed{args.seeds[0]}"
    run("blend", "--output-dir", str(main_run), "--folds", str(folds_csv))
    run("evaluate", "--output-dir", str(main_run), "--folds", str(folds_csv), "--data-dir", str(data))
    run("submit", "--data-dir", str(data), "--output-dir", str(main_run), "--description", "honest-figures")
    layout = RunLayout(main_run)
    labelled = pd.concat([read_oof(layout, BLEND_NAME, g) for g in GROUPS if read_oof(layout, BLEND_NAME, g).size],
                         ignore_index=True)
    located = pd.concat([parsed(pd.read_csv(layout.located_oof_file(BLEND_NAME, g))) for g in GROUPS
                         if layout.located_oof_file(BLEND_NAME, g).is_file()], ignore_index=True)
    test = scored_rows(layout.submissions / "submission.csv", answers / "test.csv")
    estimates = {"oof_labelled": with_interval(labelled, args.bootstrap),
                 "oof_located": with_interval(located, args.bootstrap), "test": with_interval(test, args.bootstrap)}
    train_narrowing = oracle.read_narrowing(answers, "train")
    floor = {"oof": oracle.scores(oracle.oracle_oof(train_narrowing, read_folds(folds_csv)))["oracle"],
             "test": oracle.scores(oracle.fitted_on(train_narrowing, oracle.read_narrowing(answers, "test")))["oracle"]}
    # the last epoch's held-out loss (what the OOF rows are) against the held-out best (chosen on the fold)
    epochs = {}
    for group in GROUPS:
        done = [json.loads((d / "done.json").read_text()) for d in layout.finished_fold_dirs(BACKBONE, group)]
        if done:
            epochs[group] = {"kept_last": float(np.mean([d["kept_score"] for d in done])),
                             "held_out_best": float(np.mean([d["best_score"] for d in done])),
                             "best_epochs": [d["best_epoch"] + 1 for d in done], "epochs": done[0].get("epochs")}
    suspects = suspect_labels(layout, folds)
    wrong = pd.read_csv(answers / "wrong_labels.csv").query("split == 'train'")
    noise = recall_of(suspects, wrong, share=0.05)
    timings["evaluation"] = time.perf_counter() - started - sum(timings.values())

    print(f"{args.studies} training and {args.test_studies} test studies, {args.folds} folds, noisy grades")
    print("term                  OOF labelled [90 %]        OOF located [90 %]         test [90 %]               "
          "test inside located?  oracle (OOF / test)")
    for t in TERMS:
        cells = []
        for part in ("oof_labelled", "oof_located", "test"):
            e = estimates[part].get(t)
            cells.append(f"{e['value']:.3f} [{e['interval'][0]:.3f}, {e['interval'][1]:.3f}]" if e else "-")
        lo, hi = estimates["oof_located"][t]["interval"] if t in estimates["oof_located"] else (np.nan, np.nan)
        inside = lo <= estimates["test"][t]["value"] <= hi if t in estimates["test"] else False
        print(f"{t:20s}  {cells[0]:25s}  {cells[1]:25s}  {cells[2]:25s}  {str(inside):20s}  "
              f"{floor['oof'].get(t, np.nan):.3f} / {floor['test'].get(t, np.nan):.3f}")
    print("\nlabelled-point OOF per class weighting and seed (uncalibrated / full calibration / auto):")
    for name, v in variants.items():
        print(f"  {name:28s} " + "  ".join(f"{t} {v['none'][t]:.3f}/{v['full'][t]:.3f}/{v['auto'][t]:.3f}"
                                           for t in TERMS if t in v["none"]))
    print("\nper fold, mean held-out loss of the kept (last) epoch against the held-out best (optimistic):")
    for group, e in epochs.items():
        print(f"  {group:13s} last {e['kept_last']:.3f}  best {e['held_out_best']:.3f}  (best at epochs {e['best_epochs']} "
              f"of {e['epochs']})")
    print(f"\nsuspect labels, top 5 % ({noise['listed']} of {noise['labels']}): "
          + ", ".join(f"{k} {v['found']}/{v['wrong']}" for k, v in noise.items() if isinstance(v, dict))
          + f" (a random list: {noise['random_recall']:.0%} of each)")
    report({"benchmark": "honest_figures", "studies": args.studies, "test_studies": args.test_studies,
            "folds": args.folds, "image_size": list(args.image_size), "estimates": estimates, "oracle": floor,
            "variants": variants, "epochs": epochs, "suspect_labels": noise, "seconds": timings})


if __name__ == "__main__":
    main()
