"""User-facing errors.

Anything a user can cause (a bad config value, a missing file, a world size that cannot host the
experts) raises `UserError` with a one-line message naming the field and the valid range. The CLI
prints that line and exits with status 2; it never shows a torch traceback for such mistakes.

The exit statuses of `lshmoe` and of every rank it launches are defined here, once: the CLI returns
them, the launcher reads them (a job that ended with a final status is not restarted), and the
watchdog exits a rank whose peer failed with `EXIT_DIST`.
"""

from __future__ import annotations

EXIT_USER = 2  # a mistake in the input, reported in one line (UserError)
EXIT_DIST = 3  # a peer rank died, stalled or disagreed (DistError, the watchdog's verdict)
EXIT_NUMERIC = 4  # a non-finite step under fault.nan_policy=stop (NumericalError)
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), as shells report it
EXIT_STOPPED = 143  # stopped on SIGTERM (128 + SIGTERM) after saving the step (Stopped)


class UserError(Exception):
    """A mistake in the user's input, reported as one actionable line."""


class ConfigError(UserError):
    """A config value, key or type is invalid."""


class DataError(UserError):
    """A data path is missing, empty or not text."""


class DistError(RuntimeError):
    """A distributed failure: a peer rank died, stalled or disagreed on the collective path."""


class NumericalError(RuntimeError):
    """A non-finite loss or gradient under `fault.nan_policy=stop` (a checkpoint was saved first)."""


class Stopped(Exception):
    """The job was asked to stop (SIGTERM, as a scheduler preempting it) and stopped after a step,
    saving a checkpoint of it when the run saves checkpoints (train/stop.py)."""

    exit_status = EXIT_STOPPED  # as a process killed by SIGTERM reports; launchers do not restart it
