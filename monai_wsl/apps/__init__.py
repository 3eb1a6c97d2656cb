"""Serving the bundle in other applications. :mod:`monai_wsl.apps.slide_region` turns a region request of a slide
into the localizer's regions in MONAI Label's format (no ``monailabel`` needed); :mod:`monai_wsl.apps.monailabel`
(imported on its own, it needs ``monailabel``) is the MONAI Label task around it."""

from __future__ import annotations

from .slide_region import (
    DEFAULT_LABEL_COLOR,
    MAX_REGION_PIXELS,
    SlideRegion,
    build_slide_inferer,
    check_region_request,
    infer_slide_region,
    is_region_request,
    region_annotation,
    region_tiles,
    synthetic_model_warning,
    unknown_image_message,
)
