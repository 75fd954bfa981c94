"""The project's contracts with users and launchers: the error classes printed as one line,
and the exit codes every process and launcher agrees on.

Every user mistake raises one of these classes with a one-line message naming the file,
key or value; the CLI prints it and exits with the code below, never with a traceback.
"""

from __future__ import annotations

# Exit codes. The requeue code itself is configurable (`fault.requeue_exit_code`, default
# REQUEUE_EXIT_CODE): launchers read the run's config for it.
CONFIG_OR_DATA_ERROR = 2  # bad config, data or flags: never restarted or requeued
TRAINING_STOPPED = 3  # training cannot usefully go on (non-finite steps): never restarted
REQUEUE_EXIT_CODE = 75  # preempted with a checkpoint: requeue me (EX_TEMPFAIL)
HANG_EXIT_CODE = 124  # the watchdog saw no step for too long (as timeout(1) exits)
INTERRUPTED = 130  # Ctrl-C


class ConfigError(ValueError):
    """A user error in a config file or override; the message is one actionable line."""


class DataError(ValueError):
    """Data that cannot be trained on; the message is one line naming the stream."""


class StoreError(Exception):
    """An object-store failure; the message is one line, safe to print."""


class PrepError(Exception):
    """A problem with `pretrain prep`'s inputs or flags; the message is one actionable line."""


class TrainingStopped(RuntimeError):
    """Training cannot usefully go on (e.g. repeated non-finite steps); one-line message."""
