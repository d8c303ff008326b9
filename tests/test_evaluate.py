"""OOF evaluation: figures recomputed independently from the files on disk, tables, plots, the report."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import accuracy_score, f1_score, log_loss

from spinegrade.constants import LEVELS, PROBABILITY_COLUMNS, SEVERITIES, row_id
from spinegrade.data.folds import write_csv_atomic
from spinegrade.blend import nested_blends, run_blend
from spinegrade.evaluate import run_evaluation
from spinegrade.layout import RunLayout
from spinegrade.oof import complete_names


def _fake_run(root, names=("good", "noisy"), studies=24, folds=3, seed=0):
    """OOF files as training writes them: one informative model, one pure noise."""
    rng = np.random.default_rng(seed)
    study_ids = 1000 + np.arange(studies)
    fold_of = {s: i % folds for i, s in enumerate(study_ids)}
    write_csv_atomic(pd.DataFrame({"study_id": study_ids, "fold": [fold_of[s] for s in study_ids]}), root / "folds.csv")
    labels = rng.choice(3, size=(studies, 5), p=[0.75, 0.15, 0.10])
    for name, sharpness in zip(names, (6.0, 0.0)):
        for fold in range(folds):
            rows = []
            for i, s in enumerate(study_ids):
                if fold_of[s] != fold:
                    continue
                for k, level in enumerate(LEVELS):
                    logits = rng.normal(0, 1, 3)
                    logits[labels[i, k]] += sharpness
                    p = np.exp(logits) / np.exp(logits).sum()
                    rows.append({"row_id": row_id(s, "spinal_canal_stenosis", level), "normal_mild": p[0],
                                 "moderate": p[1], "severe": p[2], "label": SEVERITIES[labels[i, k]], "fold": fold})
            write_csv_atomic(pd.DataFrame(rows), root / "oof" / name / "spinal" / f"fold{fold}.csv")
    return root / "folds.csv"


def test_summary_matches_an_independent_recomputation(tmp_path):
    folds = _fake_run(tmp_path)
    summary = run_evaluation(tmp_path, folds)
    assert list(zip(summary["name"], summary["group"])) == [("good", "spinal"), ("noisy", "spinal"),
                                                            ("class_prior", "spinal")]
    summary = summary.set_index("name")
    for name in ("good", "noisy"):
        oof = pd.concat([pd.read_csv(p) for p in sorted((tmp_path / "oof" / name / "spinal").glob("*.csv"))])
        y = oof["label"].map({s: i for i, s in enumerate(SEVERITIES)}).to_numpy()
        p = oof[list(PROBABILITY_COLUMNS)].to_numpy()
        spinal = log_loss(y, p, sample_weight=np.array([1, 2, 4])[y], labels=[0, 1, 2])
        study = oof["row_id"].str.split("_").str[0]
        per_study = pd.DataFrame({"study": study, "y": y == 2, "p": p[:, 2], "w": np.array([1, 2, 4])[y]}).groupby("study").max()
        any_severe = log_loss(per_study["y"], per_study["p"], sample_weight=per_study["w"], labels=[False, True])
        assert summary.loc[name, "spinal"] == pytest.approx(spinal, rel=1e-6)
        assert summary.loc[name, "any_severe_spinal"] == pytest.approx(any_severe, rel=1e-6)
        assert summary.loc[name, "score"] == pytest.approx((spinal + any_severe) / 2, rel=1e-6)
        assert summary.loc[name, "accuracy"] == pytest.approx(accuracy_score(y, p.argmax(1)))
        assert summary.loc[name, "f1_macro"] == pytest.approx(f1_score(y, p.argmax(1), average="macro"))
        assert summary.loc[name, "rows"] == len(oof) and summary.loc[name, "studies"] == 24
    assert summary.loc["good", "score"] < summary.loc["class_prior", "score"] < summary.loc["noisy", "score"], summary
    competition = pd.read_csv(tmp_path / "results" / "competition.csv").set_index("name")
    for name in ("good", "noisy", "class_prior"):  # spinal rows only: the full score is the spinal group's
        assert competition.loc[name, "groups"] == "spinal"
        assert competition.loc[name, "score"] == pytest.approx(summary.loc[name, "score"], rel=1e-9)
    metrics = json.loads((tmp_path / "results" / "good_spinal_oof_metrics.json").read_text())
    assert metrics["group"] == "spinal"
    assert set(metrics["per_fold"]) == {"0", "1", "2"} and len(metrics["per_level"]) == 5
    assert "loss" in metrics["per_level"][0]
    confusion = pd.read_csv(tmp_path / "results" / "good_spinal_confusion_matrix.csv")
    counts = confusion[confusion["table"] == "count"][list(SEVERITIES)].to_numpy()
    assert counts.sum() == 24 * 5
    ovr = pd.read_csv(tmp_path / "results" / "good_spinal_confusion_one_vs_rest.csv")
    assert (ovr[["tn", "fp", "fn", "tp"]].sum(axis=1) == 120).all()
    severe = pd.DataFrame(metrics["severe_reliability"])  # the Severe probability against the Severe share
    assert severe["count"].sum() == 24 * 5
    for figure in ("training_curves", "confusion_matrix", "reliability", "per_level", "severe_reliability"):
        if figure != "training_curves":  # no metrics.csv in a fabricated run
            assert (tmp_path / "plots" / f"good_spinal_{figure}.png").stat().st_size > 5000
    assert (tmp_path / "plots" / "backbones_comparison.png").is_file()


def test_incomplete_backbones_are_left_out(tmp_path, logged):
    folds = _fake_run(tmp_path)
    (tmp_path / "oof" / "noisy" / "spinal" / "fold2.csv").unlink()
    complete, partial = complete_names(RunLayout(tmp_path), "spinal", [0, 1, 2])
    assert complete == ["good"] and partial == {"noisy": [2]}
    summary = run_evaluation(tmp_path, folds)
    lines = logged()
    assert list(summary["name"]) == ["good", "class_prior"]
    assert any("noisy" in line and "[2]" in line for line in lines)


def test_report_is_self_contained(tmp_path):
    folds = _fake_run(tmp_path)
    run_evaluation(tmp_path, folds)
    page = (tmp_path / "report.html").read_text()
    assert "good" in page and "noisy" in page and "class_prior" in page
    sources = re.findall(r'src="([^"]+)"', page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "http://" not in page and "https://" not in page


@pytest.mark.slow
def test_report_renders_in_headless_chromium(tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (Debian package chromium)")
    folds = _fake_run(tmp_path)
    run_evaluation(tmp_path, folds)
    shot = tmp_path / "report.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
                    f"--screenshot={shot}", "--window-size=1280,2000", (tmp_path / "report.html").as_uri()],
                   capture_output=True, timeout=120)
    assert shot.is_file() and shot.stat().st_size > 20000


def test_end_to_end_column_grades_held_out_studies_at_the_locators_points(trained_run, own_run):
    out = own_run  # evaluation writes its results and report
    run_blend(out, trained_run["folds"])  # the blend's located row too
    summary = run_evaluation(out, trained_run["folds"], data_dir=trained_run["data"])
    assert set(summary["group"]) == {"spinal", "foraminal", "subarticular"}  # the groups the run trained
    summary = summary.set_index(["name", "group"])
    for name, group in (("efficientnet_lite0", "spinal"), ("efficientnet_lite0_wide", "spinal"),
                        ("efficientnet_lite0", "foraminal"), ("efficientnet_lite0", "subarticular")):
        assert np.isfinite(summary.loc[(name, group), "score_located"])
        located = pd.read_csv(out / "oof" / "localised" / group / f"{name}.csv")
        oof = pd.concat([pd.read_csv(p) for p in (out / "oof" / name / group).glob("fold*.csv")])
        if group == "spinal":
            assert set(located["row_id"]) == set(oof["row_id"])  # the same held-out levels, located instead
        else:  # a point outside its series' volume is left to the prior
            assert set(located["row_id"]) <= set(oof["row_id"]) and len(located) >= 0.9 * len(oof)
        # Every study is located by the fold locator that never saw it: same fold on both sides.
        merged = located.merge(oof, on="row_id", suffixes=("_loc", ""))
        assert (merged["fold_loc"] == merged["fold"]).all()
    for group in ("spinal", "foraminal", "subarticular"):
        assert summary.loc[("efficientnet_lite0", group), "score_located"] < summary.loc[("class_prior", group), "score"]
    page = (out / "report.html").read_text()
    assert "score_located" in page
    # the blend's located rows: each fold mixed with the weights fitted on the other folds, never on its own
    located = {n: pd.read_csv(out / "oof" / "localised" / "spinal" / f"{n}.csv").set_index("row_id")
               for n in ("efficientnet_lite0", "efficientnet_lite0_wide", "blend")}
    per_fold = nested_blends(out, "spinal")
    assert sorted(per_fold) == [0, 1, 2]
    for fold, blend in per_fold.items():
        rows = located["blend"].index[located["blend"]["fold"] == fold]
        members = [located[n].loc[rows, list(PROBABILITY_COLUMNS)].to_numpy() for n in blend.backbones]
        studies = np.array([int(r.split("_")[0]) for r in rows])  # the Severe factor acts per study
        np.testing.assert_allclose(located["blend"].loc[rows, list(PROBABILITY_COLUMNS)].to_numpy(),
                                   blend.combine(members, studies), atol=1e-6)
    # every training label ranked by how far its out-of-fold probabilities disagree with it
    suspects = pd.read_csv(out / "results" / "suspect_labels.csv")
    assert len(suspects) == sum(len(pd.concat([pd.read_csv(p) for p in (out / "oof" / "blend" / g).glob("fold*.csv")]))
                                for g in ("spinal", "foraminal", "subarticular"))
    assert suspects["disagreement"].is_monotonic_decreasing and list(suspects["rank"]) == list(range(1, len(suspects) + 1))
    top = suspects.iloc[0]
    weight = {"Normal/Mild": 1, "Moderate": 2, "Severe": 4}[top["label"]]
    assert top["disagreement"] == pytest.approx(weight * -np.log(top["p_label"]), rel=1e-6)
    assert "Suspect labels" in page and f"{top['study_id']}-spinegrade/study.html" in page
