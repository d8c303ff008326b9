"""User-facing errors.

A :class:`SpinegradeError` is a problem with the user's input or settings (a missing CSV, a
wrong column, an unreadable file). The command line prints its message on one line and exits
with status 2 instead of showing a traceback; anything else is a bug and keeps its traceback.
"""


class SpinegradeError(Exception):
    """A problem the user can fix; its message names the file (and row) at fault."""


class DicomReadError(SpinegradeError):
    """A DICOM file that cannot be read or decoded. Callers decide whether to skip it."""

    def __init__(self, path, reason: str):
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: unreadable DICOM file ({reason})")
