from __future__ import annotations

from .array import BinarizeMask, EnsureRGB, filename_of, intensity_on_tensors
from .augment import (
    RandColorJitterD,
    RandColorJitterd,
    RandColorJitterDict,
    ResizeShortSide,
    ResizeShortSideD,
    ResizeShortSided,
    ResizeShortSideDict,
    hsv_to_rgb,
    rgb_to_hsv,
)
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
    EmptyMaskD,
    EmptyMaskd,
    EmptyMaskDict,
    EnsureRGBD,
    EnsureRGBd,
    EnsureRGBDict,
)
from .post import SplitPredictionD, SplitPredictiond, SplitPredictionDict
