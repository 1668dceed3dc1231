"""Deprecated: operation counts of whole models moved to :mod:`eventful_pl.models.gflops`.

This module imports models, so it left the core package; importing it warns
and gives the new module itself (same functions, same state).
"""

from __future__ import annotations

import sys
import warnings

from eventful_pl.models import gflops as _moved

warnings.warn(
    "eventful_pl.gflops moved to eventful_pl.models.gflops; import it from there",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = _moved
