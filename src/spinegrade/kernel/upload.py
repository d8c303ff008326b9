"""Send a built kernel to Kaggle: create or version its two datasets, then push the kernel.

Everything goes through the ``kaggle`` command, so what runs is what a user could type; ``--dry-run``
prints exactly those commands.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from spinegrade.download import has_kaggle_credentials, kaggle_executable
from spinegrade.errors import SpinegradeError
from spinegrade.kernel import DEFAULT_NAME
from spinegrade.kernel.build import PLACEHOLDER_USER
from spinegrade.logs import get_logger, result

log = get_logger(__name__)


def _run(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True)


def _read_id(path: Path) -> str:
    if not path.is_file():
        raise SpinegradeError(f"{path}: missing; build the kernel first (`make kernel`)")
    identifier = json.loads(path.read_text()).get("id", "")
    if identifier.startswith(f"{PLACEHOLDER_USER}/"):
        raise SpinegradeError(f"{path}: the id is {identifier!r}; rebuild with KAGGLE_USERNAME=<your user> make kernel")
    return identifier


def upload(kernels_dir: str | Path, name: str = DEFAULT_NAME, message: str = "spinegrade kernel",
           dry_run: bool = False) -> list[list[str]]:
    """Upload ``kernels_dir/<name>-code``, ``<name>-models`` and the kernel ``<name>``; returns the
    commands run (or, with ``dry_run``, that would run)."""
    kernels_dir = Path(kernels_dir)
    datasets = [kernels_dir / f"{name}-code", kernels_dir / f"{name}-models"]
    kernel = kernels_dir / name
    ids = [_read_id(d / "dataset-metadata.json") for d in datasets]
    _read_id(kernel / "kernel-metadata.json")
    kaggle = "kaggle" if dry_run else kaggle_executable()
    if dry_run:
        commands = []
        for folder, identifier in zip(datasets, ids):
            commands.append([kaggle, "datasets", "status", identifier])
            result(log, f"{' '.join(commands[-1])}   # exists? then:")
            commands.append([kaggle, "datasets", "version", "-p", str(folder), "-m", message, "--dir-mode", "zip"])
            result(log, f"  {' '.join(commands[-1])}")
            commands.append([kaggle, "datasets", "create", "-p", str(folder), "--dir-mode", "zip"])
            result(log, f"  {' '.join(commands[-1])}   # (first upload)")
        commands.append([kaggle, "kernels", "push", "-p", str(kernel)])
        result(log, " ".join(commands[-1]))
        return commands
    if not has_kaggle_credentials():
        raise SpinegradeError("no Kaggle credentials: put kaggle.json in ~/.kaggle/ or set KAGGLE_USERNAME and KAGGLE_KEY")
    commands = []
    for folder, identifier in zip(datasets, ids):
        exists = _run([kaggle, "datasets", "status", identifier]).returncode == 0
        command = ([kaggle, "datasets", "version", "-p", str(folder), "-m", message, "--dir-mode", "zip"] if exists
                   else [kaggle, "datasets", "create", "-p", str(folder), "--dir-mode", "zip"])
        commands.append(command)
        _check(command)
    commands.append([kaggle, "kernels", "push", "-p", str(kernel)])
    _check(commands[-1])
    log.info("uploaded; the kernel runs once Kaggle has processed the datasets (`kaggle kernels status` follows it)")
    return commands


def _check(command: list[str]) -> None:
    log.info(" ".join(command))
    completed = _run(command)
    if completed.returncode != 0:
        reason = (completed.stderr or completed.stdout).strip().splitlines()
        raise SpinegradeError(f"`{' '.join(command[1:4])}` failed (network or credentials?): "
                              f"{reason[-1] if reason else 'no output'}")
