from __future__ import annotations

from .overlay import (
    COLORS,
    contour,
    display_image,
    legend,
    mask_overlay_panels,
    overlay_grid,
    slide_thumbnail,
    tint,
    to_uint8,
)
