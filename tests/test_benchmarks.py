"""Benchmarks are scripts, not timed tests: this only checks that they run and print their JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str, results: str | None = None) -> dict:
    """The script's JSON line; its results file (``results``, default named after the script) goes to a
    scratch folder, never over benchmarks/results/."""
    with tempfile.TemporaryDirectory() as scratch:
        env = {**os.environ, "SPINEGRADE_BENCHMARK_RESULTS": scratch}
        result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True,
                                text=True, timeout=600, env=env)
        written = sorted(Path(scratch).glob("*.json"))
        if result.returncode == 0 and "--out" not in args:
            assert [p.name for p in written] == [results or f"{Path(script).stem}.json"]
            assert json.loads(written[0].read_text()) == json.loads(result.stdout.strip().splitlines()[-1])
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_predict_speed_benchmark_runs(trained_run):
    figures = _run("predict_speed.py", "--data-dir", str(trained_run["data"]), "--output-dir", str(trained_run["out"]),
                   "--repeats", "1", "--profile", "5")
    assert figures["benchmark"] == "predict_speed" and figures["studies"] == 5
    assert len(figures["profile_top"]) == 6 and "tottime" in figures["profile_top"][0]  # its header, then 5 functions
    # what the README quotes: seconds per study, its two parts (within it), the one-off loading, the projection
    per_study, load = figures["seconds_per_study_median"], figures["model_loading_seconds_once_median"]
    parts = figures["read_and_locate_seconds_per_study_median"] + figures["grade_seconds_per_study_median"]
    assert 0 < parts <= per_study and load > 0
    assert abs(figures["projected_minutes_for_studies"]["500"] - (load + 500 * per_study) / 60) < 1e-9


def test_study_page_speed_benchmark_runs(trained_run):
    figures = _run("study_page_speed.py", "--data-dir", str(trained_run["data"]), "--output-dir", str(trained_run["out"]),
                   "--studies", "1", "--repeats", "1")
    assert figures["benchmark"] == "study_page_speed" and figures["studies"] == 1
    # what the README quotes: both medians, the maps' own time within the page's, the ratio of the two
    plain, with_maps = figures["seconds_per_study_without_maps_median"], figures["seconds_per_study_with_maps_median"]
    assert 0 < figures["maps_seconds_per_study_median"] < with_maps and figures["maps_per_study_median"] >= 20
    assert abs(figures["with_over_without"] - with_maps / plain) < 1e-9


def test_kernel_speed_benchmark_runs(trained_run, own_run):
    from spinegrade.blend import run_blend

    run_blend(own_run, trained_run["folds"])  # the kernel carries a blend
    figures = _run("kernel_speed.py", "--data-dir", str(trained_run["data"]), "--output-dir", str(own_run),
                   "--repeats", "1")
    assert figures["benchmark"] == "kernel_speed" and figures["studies"] == 5
    # what the README quotes: per study from the difference of the whole split and its half, the fixed cost,
    # the projection, the datasets' sizes (timings themselves are never compared here)
    whole, half, per_study = figures["kernel_seconds_median"], figures["half_seconds_median"], figures["seconds_per_study"]
    assert abs(per_study * (5 - 5 // 2) - (whole - half)) < 1e-6
    assert abs(figures["fixed_seconds"] - (whole - 5 * per_study)) < 1e-6
    assert abs(figures["projected_minutes"] - (figures["fixed_seconds"] + 500 * per_study) / 60) < 1e-9
    assert figures["sizes_mb"]["spinegrade-rsna-2024-models"] > 1  # the models dataset carries real weights


def test_loader_speed_benchmark_runs(synth_dataset):
    figures = _run("loader_speed.py", "--data-dir", str(synth_dataset), "--samples", "24", "--model-size", "64",
                   "--batch-size", "8", "--repeats", "1")
    assert figures["samples"] == 24
    assert figures["loader_samples_per_s"] > 0 and figures["published_samples_per_s"] > 0
    assert figures["epoch_over_compute"] > 0


def test_preprocess_speed_benchmark_runs(synth_dataset):
    figures = _run("preprocess_speed.py", "--data-dir", str(synth_dataset), "--repeats", "1", "--workers", "2")
    assert figures["files"] > figures["series"] > 0 and figures["cache_files_per_s"] > 0
    assert figures["cache_kb_per_study"] > 0


def test_memory_scaling_benchmark_runs():
    figures = _run("memory_scaling.py", "--studies", "6", "--factor", "2")
    assert figures["large"]["studies"] == 12 and figures["small"]["anon_mb"] > 0


def test_gpu_benchmark_runs_on_the_cpu_too():
    figures = _run("gpu_train_speed.py", "--configs", "resnet18", "--steps", "2", "--workers", "1", "--model-size", "64",
                   "--batch-size", "4", "--studies", "4", "--image-size", "96", "128", "--device", "cpu")
    assert [(r["config"], r["loader"]) for r in figures["rows"]] == [("resnet18", "ring"), ("resnet18", "dataloader")]
    assert all(r["ratio"] > 0 for r in figures["rows"])


def test_batch_transfer_benchmark_runs(synth_dataset):
    figures = _run("batch_transfer.py", "--data-dir", str(synth_dataset), "--model-size", "64", "--batch-size", "4",
                   "--rounds", "2", "--settle", "0.3")
    assert figures["dataloader_us_per_batch"] > 0 and figures["ring_us_per_batch"] > 0
    assert figures["ring_reused_buffer_us_per_batch"] > 0


def test_storage_invariance_benchmark_runs(trained_run):
    figures = _run("storage_invariance.py", "--data-dir", str(trained_run["data"]), "--output-dir", str(trained_run["out"]),
                   "--answers", str(trained_run["answers"] / "test.csv"), "--variants", "4:3, centred", "8 bits")
    assert [r["variant"] for r in figures["rows"]] == ["as stored", "4:3, centred", "8 bits"]
    assert all(r["studies"] == 5 and 0 < r["spinal"] < 5 for r in figures["rows"])
    # what the README quotes: how far the points moved when the same anatomy is stored otherwise (mm)
    assert figures["rows"][0]["shift_median_mm"] == 0 and all(0 <= r["shift_median_mm"] < 20 for r in figures["rows"])


def test_index_speed_benchmark_runs(synth_dataset, tmp_path):
    out = tmp_path / "index_speed.json"
    figures = _run("index_speed.py", "--data-dir", str(synth_dataset), "--repeats", "1", "--out", str(out))
    assert figures["files"] > figures["series"] > 0 and figures["all_cores_files_per_s"] > 0
    assert abs(figures["projected_minutes_147000_files"] - 147_000 / figures["all_cores_files_per_s"] / 60) < 1e-9
    assert json.loads(out.read_text())["files"] == figures["files"]


def test_kernel_budget_benchmark_runs():
    figures = _run("kernel_budget.py", "--configs", "resnet18", "efficientnet_lite0", "--image-size", "32",
                   "--batch", "2", "--repeats", "1", "--folds", "2")
    assert [r["config"] for r in figures["rows"]] == ["resnet18", "efficientnet_lite0"]
    assert figures["classifiers"] == 2 * 2 * 3 and figures["images_per_study"] == 25
    assert all(r["gflops_per_image"] > 0 and r["weights_mb"] > 1 for r in figures["rows"])
    hours = figures["projection"]["cpu"]["hours_per_studies"]
    assert hours["2"] > hours["1"] > 0  # each fold adds its models' time


def test_label_geometry_benchmark_runs():
    figures = _run("label_geometry.py", "--studies", "20", "--seed", "2")
    assert figures["generated"]["studies"] == 20 and figures["real"]["studies"] == 1974
    assert 0 <= figures["generated"]["canal_several_slices"] <= 1


def test_recipe_benchmark_runs(trained_run, tmp_path):
    figures = _run("recipe.py", "--factor", "slices", "--values", "1", "3", "--groups", "subarticular", "--data-dir",
                   str(trained_run["data"]), "--folds", str(trained_run["folds"]), "--output-dir", str(trained_run["out"]),
                   "--scratch", str(tmp_path), "--num-epochs", "1", "--image-size", "32", results="recipe_slices.json")
    rows = figures["groups"]["subarticular"]
    assert figures["factor"] == "slices" and set(rows) == {"1", "3"}
    assert rows["1"]["over_reference"]["labelled"]["subarticular"] == 1.0
    assert all(0 < r[way]["subarticular"] < 5 for r in rows.values() for way in ("labelled", "end_to_end"))
    for value in ("1", "3"):  # each value is its own model, reading that many slices
        spec = json.loads((tmp_path / "subarticular" / "trained_models" / f"lite0_slices{value}" / "subarticular" / "fold0"
                           / "model.json").read_text())
        assert spec["slices"] == int(value)


def test_hand_feature_benchmark_runs(trained_run, tmp_path):
    figures = _run("hand_feature.py", "--groups", "subarticular", "--data-dir", str(trained_run["data"]), "--folds",
                   str(trained_run["folds"]), "--cache", str(tmp_path))
    row = figures["groups"]["subarticular"]
    assert row["samples"] > 100 and 0 < row["feature"]["subarticular"] < 5 and 0 < row["prior"]["subarticular"] < 5
    assert all(0 <= v <= 1 for v in row["mean_share_by_grade"].values())


def test_oracle_calibration_is_about_the_real_tasks_difficulty():
    """The rater's spreads keep a perfect reader of the image at 0.75 to 0.95 times the best real model's
    loss-to-prior ratio on every term (calibrated near 0.85 on 4,000 studies); the clean twin is far easier."""
    figures = _run("oracle.py", "--label-only", "2000", results="oracle_label_only.json")
    assert all(0.75 < v < 0.95 for v in figures["times_real_ratio"].values()), figures["times_real_ratio"]
    assert 0.015 < figures["wrong_label_share"] < 0.025
    clean = _run("oracle.py", "--label-only", "2000", "--clean-grades", results="oracle_label_only.json")
    assert clean["wrong_label_share"] == 0
    assert all(clean["ratio"][k] < 0.6 * figures["ratio"][k] for k in figures["times_real_ratio"]), clean["ratio"]


def test_oracle_on_a_run_beats_the_prior_out_of_fold_and_on_test(trained_run):
    figures = _run("oracle.py", "--data-dir", str(trained_run["data"]), "--folds", str(trained_run["folds"]))
    oof, test = figures["oof"], figures["test"]
    assert all(oof["oracle"][k] < oof["prior"][k] for k in oof["oracle"]), oof
    assert test["oracle"]["score"] < test["prior"]["score"], test  # 5 test studies: the score, not each term


def test_honest_figures_benchmark_runs(tmp_path):
    figures = _run("honest_figures.py", "--root", str(tmp_path / "run"), "--studies", "12", "--test-studies", "4",
                   "--image-size", "64", "80", "--folds", "2", "--seeds", "42", "--weightings", "competition",
                   "--epochs", "1", "--bootstrap", "50", "--groups", "spinal")
    for part in ("oof_labelled", "oof_located", "test"):
        value = figures["estimates"][part]["score"]
        assert value["interval"][0] <= value["value"] <= value["interval"][1], (part, value)
    assert set(figures["variants"]) == {"competition, seed 42"}
    assert 0 <= figures["suspect_labels"]["all"]["found"] <= figures["suspect_labels"]["all"]["wrong"]
    assert set(figures["epochs"]) == {"spinal"} and figures["epochs"]["spinal"]["epochs"] == 1  # --epochs reached the graders


def test_evidence_folds_benchmark_runs(trained_run):
    figures = _run("evidence_folds.py", "--data-dir", str(trained_run["data"]), "--output-dir", str(trained_run["out"]),
                   "--studies", "1")
    rows = figures["rows"]
    assert {key.split(",")[0] for key in rows} == {"spinal", "foraminal", "subarticular"}
    for key, row in rows.items():  # what docs/figures.md quotes: the fewer folds' share of the time, how far maps move
        assert 0 < row["time_ratio"] < 1 and row["maps"] > 0 and 0 <= row["mean_abs_difference"] <= 1, (key, row)


def test_training_time_benchmark_runs(synth_dataset, tmp_path):
    figures = _run("training_time.py", "--data-dir", str(synth_dataset), "--folds", "2", "--epochs", "1",
                   "--locator-size", "32", "--grader-size", "32", "--scratch", str(tmp_path))
    assert set(figures["locators"]) == set(figures["graders"]) == {"spinal", "foraminal", "subarticular"}
    for row in [*figures["locators"].values(), *figures["graders"].values()]:  # what docs/figures.md quotes
        assert row["epoch_seconds"] > 0 and row["projected_minutes"] > 0, row
    assert figures["locators_over_graders_ratio"] > 0
