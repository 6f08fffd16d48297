"""Former home of the training step; it lives in :mod:`edaan_fast.engine.steps`. This module
re-exports it so that existing imports keep working."""

from .steps import *  # noqa: F401,F403
from .steps import __all__  # noqa: F401
