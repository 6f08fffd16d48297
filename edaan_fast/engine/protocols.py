"""Former home of the evaluation protocols; they live in :mod:`edaan_fast.metrics.protocols`.
This module re-exports them so that existing imports keep working."""

from edaan_fast.metrics.protocols import *  # noqa: F401,F403
from edaan_fast.metrics.protocols import __all__, _sample_keys  # noqa: F401
