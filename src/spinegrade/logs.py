"""One logger for the whole package: ``spinegrade`` (modules log to ``spinegrade.<module>``, its children).

Library code never prints and never takes a ``log`` argument: it logs, and whoever runs it decides
what is shown. The command line (:func:`setup_logging`) shows INFO and up on stderr, only warnings,
errors and the final result tables with ``--quiet`` (the :data:`RESULT` level), DEBUG too with
``--verbose``, and also writes every line at INFO and up to a file in the run's output folder, so a
run's log travels with its results. A notebook or a test that sets nothing sees warnings only
(Python's default), and pytest captures every record.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

ROOT = "spinegrade"
# The final tables a command exists to print (scores, the blend, the summary): shown even with --quiet.
RESULT = 25
logging.addLevelName(RESULT, "RESULT")

_HANDLER_MARK = "_spinegrade_handler"


def get_logger(name: str) -> logging.Logger:
    """The logger of a module: ``get_logger(__name__)`` gives ``spinegrade.train`` and so on."""
    return logging.getLogger(name if name == ROOT or name.startswith(ROOT + ".") else f"{ROOT}.{name}")


def result(logger: logging.Logger, message: str) -> None:
    """Log a final result table (shown under ``--quiet`` too)."""
    logger.log(RESULT, message)


def setup_logging(quiet: bool = False, verbose: bool = False, stream=None, timestamps: bool = False) -> None:
    """The command line's handler on stderr (replacing one set before, so repeated calls in one process
    do not double lines)."""
    root = logging.getLogger(ROOT)
    for handler in [h for h in root.handlers if getattr(h, _HANDLER_MARK, "") == "console"]:
        root.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter("[%(asctime)s] %(message)s" if timestamps else "%(message)s", "%H:%M:%S"))
    handler.setLevel(logging.DEBUG if verbose else (RESULT if quiet else logging.INFO))
    setattr(handler, _HANDLER_MARK, "console")
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)


def log_to_file(path: str | Path) -> Path:
    """Also write this process's log, INFO and up with times, to ``path`` (appended: resumed runs keep
    their history). One file handler at a time."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger(ROOT)
    for handler in [h for h in root.handlers if getattr(h, _HANDLER_MARK, "") == "file"]:
        root.removeHandler(handler)
        handler.close()
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    setattr(handler, _HANDLER_MARK, "file")
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    return path


def reset_logging(level: int = logging.NOTSET) -> None:
    """Remove the handlers :func:`setup_logging` and :func:`log_to_file` added and put the logger's
    level back to ``level`` (what the end of a command-line process does anyway), so a command run
    inside another program (a notebook, a test) leaves its logging as it was."""
    root = logging.getLogger(ROOT)
    for handler in [h for h in root.handlers if getattr(h, _HANDLER_MARK, "")]:
        root.removeHandler(handler)
        handler.close()
    root.setLevel(level)


def current_settings() -> dict:
    """How this process shows the spinegrade log (the console's level, the log file), to be applied in
    processes it spawns with :func:`apply_settings`: they start with a bare interpreter."""
    settings: dict = {}
    for handler in logging.getLogger(ROOT).handlers:
        mark = getattr(handler, _HANDLER_MARK, "")
        if mark == "console":
            settings["console"] = handler.level
        elif mark == "file" and isinstance(handler, logging.FileHandler):
            settings["file"] = handler.baseFilename
    return settings


def apply_settings(settings: dict, main: bool = True) -> None:
    """The parent's logging in a spawned process; a process other than the main one shows warnings and
    errors only and writes no log file."""
    if "console" in settings:
        level = settings["console"]
        setup_logging(quiet=not main or level >= RESULT, verbose=main and level <= logging.DEBUG)
    if "file" in settings and main:
        log_to_file(settings["file"])
