"""The errors users see. Each carries the CLI exit code and the registry status it maps to.

Every message is one line that says what is wrong and what to do about it; the CLI prints it as is.
"""

from __future__ import annotations


class GradpruneError(Exception):
    """Base class: an expected failure with a one-line message for the user."""

    exit_code = 1
    status = "failed"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class BadInput(GradpruneError):
    """Input the user can fix: bad arguments, a clean set that fails validation, an unusable model."""

    exit_code = 2
    status = "rejected"


class DataError(BadInput):
    """The clean set is missing, corrupt or does not match its manifest or the model."""


class TriggerError(BadInput):
    """A trigger file is malformed or refers to files that cannot be read."""


class UnsupportedModel(BadInput):
    """The model cannot be sanitized by this method (no Conv2d, wrong number of outputs, NaN weights...)."""

    status = "unsupported"


class UnsafeModel(GradpruneError):
    """A model file would run code when unpickled; it was refused without loading."""

    exit_code = 3
    status = "unsafe"


class VerificationFailed(GradpruneError):
    """The sanitized model was written, but an independent search still found a working trigger in it: a person
    should review it before it is used."""

    exit_code = 4
    status = "unverified"


class Suspect(GradpruneError):
    """Nothing was flagged, but the flag score is above what clean models show: no model was written
    (on_clean=skip), and a person should look at the evidence."""

    exit_code = 5
    status = "suspect"
