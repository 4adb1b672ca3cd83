"""What can go wrong that a user should read as one line, and the exit status it gives.

Library modules raise these; only the command line (`medjax.cli`) turns them into
`medjax <command>: error: …` and an exit status (docs/design.md, "Command line"):

  2  UserError and its kinds: the request cannot run as asked (a flag, a config key, a
     missing or broken file, a workdir of another experiment). Refused before any work.
  1  RunError: the work started and stopped (a non-finite loss), or PartialFailure: some
     subjects failed, the others were written.
"""

from __future__ import annotations

USAGE, FAILURE = 2, 1


class MedjaxError(Exception):
  """Base of every error medjax reports without a traceback."""
  exit_status = USAGE


class UserError(MedjaxError):
  """What was asked for cannot run: a bad flag, value, file or folder."""


class ConfigError(UserError):
  """A user config that cannot run; the message says which key and why."""


class WorkdirError(UserError):
  """The workdir belongs to another experiment, or is not a medjax run."""


class RunError(MedjaxError):
  """The work started and could not go on."""
  exit_status = FAILURE


class NonFiniteError(RunError):
  """The loss or gradient norm stopped being finite; nothing from that step is saved."""


class PartialFailure(MedjaxError):
  """Some items (subjects, sweep points) failed; the others are done and written."""
  exit_status = FAILURE

  def __init__(self, message: str, failed: dict | None = None):
    super().__init__(message)
    self.failed = dict(failed or {})
