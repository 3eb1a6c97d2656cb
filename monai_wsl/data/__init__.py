from __future__ import annotations

from .camelyon16 import (
    CAMELYON16_CLASS_NAMES,
    find_camelyon16_slides,
    rasterize_annotation,
    read_asap_annotation,
)
from .check import READABLE_SUFFIXES, DataError, check_run, inspect_image
from .datalist import load_datalist
from .glas import (
    DEFAULT_VALID_FRACTION,
    GLAS_CLASS_NAMES,
    IMAGE_EXTENSIONS,
    create_glas_datalist,
    find_glas_images,
    read_glas_grades,
    read_split_csv,
    stratified_split,
)
from .slide_outputs import SlideWriter, class_summary, run_summary, slide_output_paths
from .slide_records import read_slide_status, slide_outputs_complete, slides_table, write_slides_table
from .slides import (
    SLIDE_SUFFIXES,
    ArrayPlane,
    ZeroMap,
    choose_level,
    downsample_mean,
    find_tissue,
    list_slides,
    mask_to_geojson,
    open_slide,
    opened_slide,
    otsu_threshold,
    read_region,
    slide_problems,
    survey_slide,
    tissue_mask,
    write_pyramid_tiff,
    write_rgb_pyramid,
)
from .synthetic import (
    CLASS_NAMES,
    make_synthetic_histology,
    synthetic_histology_sample,
    synthetic_volume_sample,
    write_synthetic_histology,
    write_synthetic_slide,
    write_synthetic_volumes,
)


def __getattr__(name: str) -> object:
    if name == "prepare_camelyon16":  # the pipeline moved to monai_wsl.apps.camelyon16; still importable from here
        from monai_wsl.apps.camelyon16 import prepare_camelyon16

        return prepare_camelyon16
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
