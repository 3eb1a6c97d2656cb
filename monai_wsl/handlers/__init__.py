from __future__ import annotations

from .metrics import ClassificationError, PixelAP, PixelF1, PixelFPR, PixelIoU
