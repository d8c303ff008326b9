"""Shared fixtures: one small synthetic dataset per test session, real DICOM files throughout."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from spinegrade.data.synthetic import SynthSettings, write_dataset

SHARED_METADATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "rsna-2024-metadata"


@pytest.fixture(scope="session")
def synth_dataset(tmp_path_factory) -> Path:
    """16 training and 3 test studies, images 128 to 176 pixels; shared read-only by the tests."""
    root = tmp_path_factory.mktemp("synth")
    data_dir = root / "data"
    write_dataset(data_dir, SynthSettings(studies=16, test_studies=3, seed=7, image_size=(128, 176)))
    return data_dir


@pytest.fixture
def dataset_copy(synth_dataset, tmp_path) -> Path:
    """A private copy of the synthetic dataset that a test may damage."""
    target = tmp_path / "data"
    shutil.copytree(synth_dataset, target)
    return target


@pytest.fixture
def real_metadata() -> Path:
    if not (SHARED_METADATA / "train.csv").is_file():
        pytest.skip(f"real RSNA metadata not available at {SHARED_METADATA}")
    return SHARED_METADATA
