"""Fetch the competition data with the ``kaggle`` command (never by importing the package:
it reads credentials on import and would fail in library code and tests)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from spinegrade.constants import COMPETITION
from spinegrade.errors import SpinegradeError


def kaggle_executable() -> str:
    """The ``kaggle`` command of this environment, else the one on PATH."""
    beside = Path(sys.executable).with_name("kaggle")
    found = str(beside) if beside.exists() else shutil.which("kaggle")
    if not found:
        raise SpinegradeError("the `kaggle` command is not installed (pip install kaggle)")
    return found


def kaggle_config_dirs() -> list[Path]:
    """Where the kaggle command looks for kaggle.json: KAGGLE_CONFIG_DIR when set, else its two defaults."""
    if os.environ.get("KAGGLE_CONFIG_DIR"):
        return [Path(os.environ["KAGGLE_CONFIG_DIR"])]
    return [Path.home() / ".kaggle", Path.home() / ".config" / "kaggle"]


def has_kaggle_credentials() -> bool:
    if os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY"):
        return True
    if os.environ.get("KAGGLE_API_TOKEN"):
        return True
    return any((d / "kaggle.json").is_file() or (d / "access_token").is_file() for d in kaggle_config_dirs())


def download_competition(dest: str | Path) -> Path:
    """Download and unzip the competition into ``dest/<competition>/``; return that folder."""
    dest = Path(dest)
    if not has_kaggle_credentials():
        raise SpinegradeError(
            "no Kaggle credentials: put kaggle.json in ~/.kaggle/ (or set KAGGLE_USERNAME and KAGGLE_KEY), "
            f"and accept the rules of https://www.kaggle.com/competitions/{COMPETITION}"
        )
    dest.mkdir(parents=True, exist_ok=True)
    command = [kaggle_executable(), "competitions", "download", "-c", COMPETITION, "-p", str(dest)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        reason = (result.stderr or result.stdout).strip().splitlines()
        raise SpinegradeError(f"kaggle download failed (network or credentials?): {reason[-1] if reason else 'no output'}")
    archive = dest / f"{COMPETITION}.zip"
    target = dest / COMPETITION
    try:
        with zipfile.ZipFile(archive) as z:
            z.extractall(target)
    except (OSError, zipfile.BadZipFile) as exc:
        raise SpinegradeError(f"{archive}: cannot unzip ({exc})") from None
    archive.unlink()
    return target
