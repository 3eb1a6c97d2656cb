from __future__ import annotations

from .overlay import COLORS, display_image, legend, mask_overlay_panels, overlay_grid, tint, to_uint8
