"""The errors a user can fix; the CLI prints these as one line instead of a traceback."""

from pyro_vae.checks import DataError
from pyro_vae.objectives.base import SiteMismatchError
from pyro_vae.registry import UnknownNameError
from pyro_vae.run import CheckpointError, RunDirError, UntrustedCodeError
from pyro_vae.training import TrainingDiverged

USER_ERRORS = (DataError, SiteMismatchError, UnknownNameError, CheckpointError, TrainingDiverged,
               UntrustedCodeError, RunDirError,
               ValueError, FileNotFoundError)

__all__ = ["USER_ERRORS", "CheckpointError", "DataError", "RunDirError", "SiteMismatchError", "TrainingDiverged",
           "UnknownNameError", "UntrustedCodeError"]
