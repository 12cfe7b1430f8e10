"""Errors a user can act on.

Every error raised for bad input is a :class:`DPStudyError`; the CLI prints it as one
line (no traceback unless ``--debug``), so the message itself must name the file,
field or value at fault and say what would be valid.
"""


class DPStudyError(Exception):
    """Base class: an error caused by input the user can fix."""


class DataError(DPStudyError):
    """A data file or folder is missing, malformed or inconsistent."""


class ConfigError(DPStudyError):
    """A run configuration field has an invalid value."""


class StoreError(DPStudyError):
    """A run-store entry is missing, corrupt or cannot be written."""


class RunLocked(StoreError):
    """Another process holds the run's lock (it is training it)."""


class RunCompleted(StoreError):
    """The run is already completed and the caller asked to keep completed runs."""


class Cancelled(Exception):
    """SIGTERM or SIGINT stopped a run; what was done is saved with status ``cancelled``."""


class Diverged(DPStudyError):
    """Training produced a non-finite loss (e.g. a learning rate far too large); the run
    ends as failed with this reason and a sweep goes on."""
