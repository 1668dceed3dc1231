"""Deprecated: the ``count`` command moved to :mod:`eventful_pl.lightning.count_command`.

This module imports models, so it left the core package; importing it warns
and gives the new module itself (same functions, same state).
"""

from __future__ import annotations

import sys
import warnings

from eventful_pl.lightning import count_command as _moved

warnings.warn(
    "eventful_pl.count_command moved to eventful_pl.lightning.count_command; import it from there",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = _moved
