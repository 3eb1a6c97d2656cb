from __future__ import annotations

from .array import BinarizeMask, EnsureRGB, filename_of
from .dictionary import (
    BinarizeMaskD,
    BinarizeMaskd,
    BinarizeMaskDict,
    CheckLabelD,
    CheckLabeld,
    CheckLabelDict,
    CheckSameSizeD,
    CheckSameSized,
    CheckSameSizeDict,
    EnsureRGBD,
    EnsureRGBd,
    EnsureRGBDict,
)
