"""The errors a user can fix, all in one place.

Each is raised where the problem is found, with a message that names the problem and the fix;
the ``pyro-vae`` command prints it as one line. Every other exception is a bug (ours, or in
the user's own program) and keeps its traceback. The classes also derive from the built-in
exception that Python code would expect (``ValueError`` for a bad value), so ``except
ValueError`` keeps working.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem in what the user gave (a setting, data, a program, a run directory)."""


class ConfigError(UserError, ValueError):
    """A setting, flag or option of the wrong type or out of range."""


class DataError(UserError, ValueError):
    """Data that a model cannot be trained or evaluated on."""


class ProgramError(UserError, ValueError):
    """A model or guide that cannot be built or used as named or as asked."""


class SiteMismatchError(ProgramError):
    """A model and guide whose latent sample sites disagree."""


class NotReparameterizedError(ProgramError):
    """A guide site without ``rsample`` given to a reparameterized-gradient estimator."""


class KLNotAvailableError(ProgramError):
    """A KL term the configured estimator, prior or guide cannot provide."""


class UnknownNameError(UserError, ValueError):
    """A name that is neither registered nor an importable ``module:attr`` path."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint or run file that is missing, damaged, or not pyro-vae's."""


class RunDirError(UserError, ValueError):
    """A run directory that would be overwritten, or that another process is writing."""


class UntrustedCodeError(UserError, ValueError):
    """A run names code by import path, and the caller did not trust it (``--trust-code``)."""


class TrainingDiverged(UserError, RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""
