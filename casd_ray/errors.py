"""Every error a user can cause, in one place: each is reported as one line, never a traceback.

The command line (and :func:`casd_ray.compress`) turn these into ``casd-ray: error: <line>``
and exit code 2. Each message names the config field or the file at fault and says what to
do. Anything else that escapes is a bug in casd-ray (exit code 1, ``--debug`` shows it).
This module imports nothing, so every package may use it.
"""

from __future__ import annotations


class UserError(Exception):
    """Base of the errors caused by the user's input or files (one line each)."""


class ConfigError(UserError, ValueError):
    """A config problem, phrased as one line that names the field or file."""


class SourceError(ConfigError):
    """A model source that cannot be built, as one line naming the config key."""


class StageMismatch(ConfigError):
    """A stage already in the run folder was made with other settings (one line)."""


class DataError(UserError):
    """A data problem, as one line: the path, what was expected there, and how to get it."""


class BudgetError(UserError, ValueError):
    """A budget that no candidate can meet, phrased as one line naming the config field."""


class ArtifactError(UserError, RuntimeError):
    """A file of a run folder is missing, corrupt or belongs to something else (one line)."""


class SelectionError(UserError, RuntimeError):
    """No trial can be the winner (all failed, stopped early or over budget)."""


class UntrustedRunError(UserError, RuntimeError):
    """A search folder whose Tune state this user's key did not sign (one line)."""


class SearchInterrupted(KeyboardInterrupt):
    """The search ended before every trial finished (Ctrl-C, SIGTERM): never fine-tune it."""
