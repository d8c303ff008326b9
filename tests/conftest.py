"""Shared fixtures: one small synthetic dataset per test session, real DICOM files throughout."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import pytest
from filelock import FileLock

from spinegrade.data.synthetic import SynthSettings, write_dataset

SHARED_METADATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "rsna-2024-metadata"

# Under pytest-xdist (``make test`` runs two workers), each worker gets its share of the cores for torch
# and for the processes its tests start, so that the workers do not fight over the same cores.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _CORES // _WORKERS)))


def _once_per_session(tmp_path_factory, name: str, build):
    """``build(root)`` run once per test session, its result shared: under pytest-xdist the first worker
    to ask builds it under the session's common temporary folder while the others wait on a file lock,
    then read its result back. A build that failed fails the others at once (not built again)."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return build(tmp_path_factory.mktemp(name))
    root = tmp_path_factory.getbasetemp().parent / f"shared-{name}"
    result = root / "result.pickle"
    with FileLock(str(root) + ".lock"):
        if not result.is_file():
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir()
            try:
                value = build(root)
            except Exception as exc:
                result.write_bytes(pickle.dumps(RuntimeError(f"the shared {name} failed in another worker: {exc!r}")))
                raise
            result.write_bytes(pickle.dumps(value))
    value = pickle.loads(result.read_bytes())
    if isinstance(value, Exception):
        raise value
    return value


@pytest.fixture(scope="session")
def synth_dataset(tmp_path_factory) -> Path:
    """16 training and 3 test studies, images 128 to 176 pixels; shared read-only by the tests."""
    def build(root: Path) -> Path:
        write_dataset(root / "data", SynthSettings(studies=16, test_studies=3, seed=7, image_size=(128, 176)))
        return root / "data"

    return _once_per_session(tmp_path_factory, "synth", build)


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


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A whole small run: 30+5 synthetic studies, 3 folds, every group's locator (the canal, the foramina
    and the lateral recesses, each with its slice locator), two EfficientNet-Lite0 configs (48 and 72 mm crops)
    on the spinal group and one on each of the foraminal and subarticular groups (reading three and five
    neighbouring slices as channels), every fold (``shared_run.build_shared_run``).

    Settings are tiny (CPU, seconds per fold) but every stage is the real one.
    """
    from shared_run import build_shared_run

    return _once_per_session(tmp_path_factory, "run", build_shared_run)


def _listing(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


@pytest.fixture(autouse=True)
def shared_run_untouched(request):
    """A test reads the shared trained run and never writes into it (a test that writes works on its own
    copy), so no result depends on which test ran first."""
    if "trained_run" not in request.fixturenames:
        yield
        return
    run = request.getfixturevalue("trained_run")["out"]
    before = _listing(run)
    yield
    after = _listing(run)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"the test wrote into the shared trained run: {', '.join(changed[:5])}"


@pytest.fixture
def own_run(trained_run, tmp_path) -> Path:
    """A copy of the shared trained run, for a test that writes into it (resumable state and cache left out)."""
    target = tmp_path / "own-run"
    shutil.copytree(trained_run["out"], target, ignore=shutil.ignore_patterns("last.pt", "cache"))
    return target


@pytest.fixture
def logged(caplog):
    """``logged()``: the messages the ``spinegrade`` logger emitted so far in this test (INFO and up)."""
    import logging

    caplog.set_level(logging.INFO, logger="spinegrade")
    return lambda: [r.getMessage() for r in caplog.records if r.name.startswith("spinegrade")]
