"""A region of a slide in, the localizer's regions out, in MONAI Label's whole-slide format: the part of MONAI Label's
pathology serving that needs no ``monailabel`` (:mod:`monai_wsl.apps.monailabel` wraps it in a MONAI Label task).

A viewer (QuPath, Digital Slide Archive) asks MONAI Label's ``/infer/wsi_v2/{model}`` for a region; MONAI Label splits
it into tiles and sends each as a request ``{"image": slide path, "location": (x, y), "size": (w, h), "level": l}``
(``location`` in level-0 pixels, ``size`` in pixels of ``level``: OpenSlide's ``read_region`` convention, which MONAI
Label's pathology app reads tiles by). :func:`infer_slide_region` runs :meth:`~monai_wsl.inferers.SlideInferer.
infer_region` on it (the whole-slide path's patch size, overlap, preprocessing, network pass and merging) and gives
the label map and the annotation MONAI Label's ``infer_wsi`` gathers from each tile into its DSA / ASAP / JSON output:
the regions ``M >= threshold`` as polygons in level-0 pixels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from monai_wsl.data.check import DataError
from monai_wsl.data.slides import SLIDE_SUFFIXES, mask_to_geojson, opened_slide, read_region
from monai_wsl.model_card import synthetic_model_warning

__all__ = [
    "DEFAULT_LABEL_COLOR",
    "MAX_REGION_PIXELS",
    "SlideRegion",
    "build_slide_inferer",
    "check_region_request",
    "region_annotation",
    "infer_slide_region",
    "is_region_request",
    "region_tiles",
    "synthetic_model_warning",
    "unknown_image_message",
]

#: the regions' colour (RGB), as in the bundle's GeoJSON and thumbnails
DEFAULT_LABEL_COLOR = (0, 166, 166)
#: the most pixels one region request may ask for (8192 x 8192): MONAI Label's ``/infer/wsi_v2`` splits larger
#: regions into tiles (``tile_size``)
MAX_REGION_PIXELS = 2**26


class SlideRegion:
    """A checked region request: the slide, ``location`` ``(x, y)`` in level-0 pixels, ``size`` ``(w, h)`` in pixels
    of ``level``, the level's ``downsample`` (level-0 pixels per pixel) and ``level_size`` ``(w, h)``, and
    ``inside`` ``(w, h)``: the part of the region on the slide (the rest lies beyond its right or bottom edge)."""

    def __init__(
        self,
        slide: Path,
        location: tuple[int, int],
        size: tuple[int, int],
        level: int,
        downsample: float,
        level_size: tuple[int, int],
    ) -> None:
        self.slide, self.location, self.size, self.level = slide, location, size, level
        self.downsample, self.level_size = downsample, level_size
        # as SlideInferer.infer_region whitens the pixels beyond the slide
        self.inside = (
            max(0, min(size[0], level_size[0] - round(location[0] / downsample))),
            max(0, min(size[1], level_size[1] - round(location[1] / downsample))),
        )

    def __repr__(self) -> str:
        return (
            f"SlideRegion({self.slide}, location={self.location}, size={self.size}, level={self.level}, "
            f"downsample={self.downsample:g})"
        )


def _refuse(problem: str) -> DataError:
    return DataError([problem], "the region request")


def _pair(request: Mapping[str, Any], key: str, slide: Any, default: Any = None) -> tuple[int, int]:
    value = request.get(key, default)
    try:
        if isinstance(value, (str, bytes)):
            raise ValueError
        pair = tuple(int(v) for v in value)
        if len(pair) != 2 or any(float(v) != int(v) for v in value):
            raise ValueError
    except (TypeError, ValueError):
        what = "x, y" if key == "location" else "width, height"
        raise _refuse(f"slide {slide}: {key} must be two whole numbers ({what}), not {value!r}") from None
    return pair  # type: ignore[return-value]


def check_region_request(request: Mapping[str, Any], backend: str = "openslide") -> SlideRegion:
    """Check a region request (``image``, ``location``, ``size``, ``level``) against its slide: the slide exists and
    is read by ``backend``, the level exists, the size is positive and at most :data:`MAX_REGION_PIXELS`, the region
    starts on the slide (it may reach past the right or bottom edge). A :class:`~monai_wsl.data.DataError` names the
    slide, what is wrong and the fix."""
    slide, location, size, level = _read_request(request)
    with opened_slide(slide, backend) as (reader, wsi):  # names a missing or unreadable slide; a long-running
        return _region_on(reader, wsi, slide, location, size, level)  # server keeps no handle per request


def _read_request(request: Mapping[str, Any]) -> tuple[Path, tuple[int, int], tuple[int, int], int]:
    """The request's slide, ``location``, ``size`` and ``level``, checked for form (not yet against the slide)."""
    slide = request.get("image")
    if not isinstance(slide, (str, Path)) or not str(slide):
        raise _refuse(f"the request's image must be the path of a slide file, not {type(slide).__name__} {slide!r}")
    slide = Path(slide)
    location = _pair(request, "location", slide, (0, 0))
    if request.get("size") is None:
        raise _refuse(
            f"slide {slide}: the request has no size: ask for a region (width, height) in pixels of its level"
        )
    size = _pair(request, "size", slide)
    level_value = request.get("level", 0)
    try:
        level = int(0 if level_value is None else level_value)
    except (TypeError, ValueError):
        raise _refuse(f"slide {slide}: level must be a whole number, not {level_value!r}") from None
    return slide, location, size, level


def _region_on(
    reader: Any, wsi: Any, slide: Path, location: tuple[int, int], size: tuple[int, int], level: int
) -> SlideRegion:
    """The region of a request on its open slide, checked against the slide's levels and size."""
    n = reader.get_level_count(wsi)
    if not 0 <= level < n:
        sizes = ", ".join(f"{i}: {tuple(reader.get_size(wsi, i))[::-1]}" for i in range(n))
        raise _refuse(
            f"slide {slide} has no level {level}: it has {n} level(s) (width x height: {sizes}); ask for a level "
            f"from 0 to {n - 1}"
        )
    if min(size) <= 0 or size[0] * size[1] > MAX_REGION_PIXELS:
        raise _refuse(
            f"slide {slide}: size {size} at level {level} is {'empty' if min(size) <= 0 else 'too large'}: ask "
            f"for 1 to {MAX_REGION_PIXELS} pixels (MONAI Label's /infer/wsi_v2 splits a large region into "
            "tile_size tiles)"
        )
    h0, w0 = (int(v) for v in reader.get_size(wsi, 0))
    if min(location) < 0 or location[0] >= w0 or location[1] >= h0:
        raise _refuse(
            f"slide {slide}: the region at location {location} (level-0 pixels) does not start on the slide, "
            f"whose level 0 is {w0} x {h0} pixels: ask for a location from (0, 0) to ({w0 - 1}, {h0 - 1})"
        )
    h, w = (int(v) for v in reader.get_size(wsi, level))
    return SlideRegion(slide, location, size, level, float(reader.get_downsample_ratio(wsi, level)), (w, h))


def region_annotation(
    mask: np.ndarray,
    location: Sequence[float],
    downsample: float = 1.0,
    label: str = "gland",
    color: Sequence[int] = DEFAULT_LABEL_COLOR,
    min_poly_area: float = 0.0,
    tolerance: float = 0.5,
    size: Sequence[int] | None = None,
    level: int = 0,
) -> dict:
    """The regions of a binary ``(H, W)`` region mask as MONAI Label's annotation of a tile (what its pathology
    ``FindContoursd`` puts under ``result["annotation"]`` and ``infer_wsi`` gathers):
    ``{"location", "size", "level", "elements": [{"label", "contours"}], "labels": {label: color}}``.

    One element per edge-connected region: its exterior ring first, then its holes, each a closed list of ``[x, y]``
    in level-0 pixels (the region's mask pixel ``(r, c)`` covers ``location + [c, c + 1) x [r, r + 1)`` times
    ``downsample``), traced by :func:`~monai_wsl.data.mask_to_geojson` and simplified within ``tolerance`` mask
    pixels. Coordinates are not rounded to integers (rounding would move an edge by half a pixel); DSA JSON, ASAP XML
    and QuPath read decimals. Regions under ``min_poly_area`` pixels of the mask (MONAI Label's ``min_poly_area``, in
    pixels of the level read) are left out."""
    mask = np.asarray(mask, bool)
    if mask.ndim != 2:
        raise ValueError(f"region_annotation needs an (H, W) mask, got shape {mask.shape}.")
    x0, y0 = float(location[0]), float(location[1])
    collection = mask_to_geojson(
        mask, downsample, name=label, min_area=float(min_poly_area) * downsample**2, tolerance=tolerance
    )
    elements = []
    for feature in collection["features"]:
        rings = feature["geometry"]["coordinates"]
        contours = [[[round(x + x0, 2), round(y + y0, 2)] for x, y in ring] for ring in rings]
        elements.append({"label": label, "contours": contours})
    return {
        "location": [int(x0), int(y0)],
        "size": [int(v) for v in (size if size is not None else mask.shape[::-1])],
        "level": int(level),
        "elements": elements,
        "labels": {label: [int(c) for c in color]},
    }


def _thresholds(request: Mapping[str, Any], default: float, slide: Path) -> tuple[float, float]:
    """The request's ``threshold`` (``default`` when not given) and ``min_poly_area`` (default 0), checked."""
    threshold, min_poly_area = request.get("threshold"), request.get("min_poly_area")
    try:
        threshold = float(default if threshold is None else threshold)
        min_poly_area = float(min_poly_area or 0.0)
    except (TypeError, ValueError):
        raise _refuse(
            f"slide {slide}: threshold and min_poly_area must be numbers, not {threshold!r} and {min_poly_area!r}"
        ) from None
    if not 0.0 <= threshold <= 1.0:
        raise _refuse(f"slide {slide}: threshold {threshold} is not a mask probability: ask for 0 to 1")
    return threshold, min_poly_area


def infer_slide_region(
    inferer: Any,
    request: Mapping[str, Any],
    label: str | None = None,
    color: Sequence[int] = DEFAULT_LABEL_COLOR,
) -> dict[str, Any]:
    """Run one region request through ``inferer`` (a :class:`~monai_wsl.inferers.SlideInferer`): the request is
    checked (as :func:`check_region_request` does) and its pixels read, the slide opened once;
    :meth:`~monai_wsl.inferers.SlideInferer.infer_pixels` gives the region's mask ``M`` (as ``infer_region`` does),
    and the regions ``M >= threshold`` become MONAI Label's annotation (:func:`region_annotation`).

    The request's optional ``threshold`` (default: the inferer's) and ``min_poly_area`` (default 0, in pixels of the
    level read) are honoured. The part of the region beyond the slide's edge is never a region (its ``pred`` is 0).

    Returns ``{"pred": (H, W) uint8 label map (1 = label), "mask": (H, W) float32 M, "prob": (K,) class
    probabilities, "class_probabilities": {class name: probability}, "annotation": MONAI Label's annotation, "region":
    the checked SlideRegion}``. Calls from several threads may share an inferer (the MONAI Label task still runs one
    at a time, so that one model on one device is not asked for several regions' memory at once).
    """
    slide, location, size, level = _read_request(request)
    with opened_slide(slide, getattr(inferer, "backend", "openslide")) as (reader, wsi):  # once for the request
        region = _region_on(reader, wsi, slide, location, size, level)
        threshold, min_poly_area = _thresholds(request, getattr(inferer, "threshold", 0.5), slide)
        image = read_region(slide, region.location, region.size, region.level, opened=(reader, wsi))
    out = inferer.infer_pixels(image)  # as SlideInferer.infer_region, on the pixels read here
    mask = np.asarray(out["mask"], np.float32)
    if mask.shape != region.size[::-1]:
        raise RuntimeError(f"infer_region gave a mask of shape {mask.shape} for {region}; expected {region.size[::-1]}")
    pred = (mask >= threshold).astype(np.uint8)
    inside_w, inside_h = region.inside
    pred[inside_h:, :] = 0
    pred[:, inside_w:] = 0
    label = label or getattr(inferer, "region_name", "gland")
    annotation = region_annotation(
        pred,
        region.location,
        region.downsample,
        label=label,
        color=color,
        min_poly_area=min_poly_area,
        size=region.size,
        level=region.level,
    )
    prob = np.asarray(out["prob"], np.float32)
    names = list(getattr(inferer, "class_names", [])) or [str(i) for i in range(len(prob))]
    return {
        "pred": pred,
        "mask": mask,
        "prob": prob,
        "class_probabilities": {str(n): round(float(p), 6) for n, p in zip(names, prob)},
        "annotation": annotation,
        "region": region,
    }


def build_slide_inferer(
    bundle_root: str | Path,
    checkpoint: str | Path | None = None,
    device: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Any:
    """The bundle's own :class:`~monai_wsl.inferers.SlideInferer`: ``configs/inference.json`` +
    ``configs/inference_wsi.json`` of ``bundle_root`` parsed by MONAI's ``ConfigParser`` (the network, the patch
    size, overlap, preprocessing and threshold the whole-slide command uses), its weights loaded from ``checkpoint``
    (default: the bundle's ``models/model.pt``) by the bundle's checked loader, whose errors name the file.

    Args:
        bundle_root: the bundle folder (holding ``configs/``).
        checkpoint: the model file.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``... (default: the bundle's, CUDA when there is one).
        overrides: other config values by id (e.g. ``{"patch_size": 256}``), as ``--key value`` on the command line.
    """
    from monai.bundle import ConfigParser

    bundle_root = Path(bundle_root)
    configs = [bundle_root / "configs" / name for name in ("inference.json", "inference_wsi.json")]
    missing = [str(c) for c in configs if not c.is_file()]
    if missing:
        raise FileNotFoundError(
            f"bundle {bundle_root} lacks {', '.join(missing)}: pass the monai_wsl bundle folder (the one holding "
            "configs/inference.json and configs/inference_wsi.json)."
        )
    parser = ConfigParser()
    parser.read_config([str(c) for c in configs])
    parser["bundle_root"] = str(bundle_root)
    if checkpoint is not None:
        parser["checkpoint"] = str(checkpoint)
    if device is not None:
        parser["device"] = f"$torch.device({str(device)!r})"
    for key, value in (overrides or {}).items():
        parser[key] = value
    inferer = parser.get_parsed_content("slide_inferer")
    try:
        loader = parser.get_parsed_content("checkpoint_loader")
    except RuntimeError as e:  # ConfigParser wraps the loader's own error, which names the file and the fix
        if isinstance(e.__cause__, (FileNotFoundError, ValueError)):
            raise e.__cause__ from None
        raise
    loader.load()
    inferer.network.eval()
    return inferer


def region_tiles(region: SlideRegion, tile_size: Sequence[int]) -> list[dict[str, Any]]:
    """The tiles that cover ``region`` whole at its level: ``tile_size`` ``(w, h)`` in pixels of the level, each tile
    ``{"location": (x, y) in level-0 pixels, "size": (w, h) in pixels of the level}``, in rows.

    MONAI Label 0.8.5's ``infer_wsi`` cuts a region into tiles in level-0 pixels but reads each tile's size at the
    request's level, so at a level above 0 its tiles cover a part of the region only; the MONAI Label app gives it these
    tiles instead (its ``wsi_tiles``)."""
    tw, th = (int(v) for v in tile_size)
    if tw <= 0 or th <= 0:
        raise _refuse(f"slide {region.slide}: tile_size {tuple(tile_size)} must be two positive whole numbers")
    (x, y), (w, h), d = region.location, region.size, region.downsample
    return [
        {"location": (x + round(c * d), y + round(r * d)), "size": (min(tw, w - c), min(th, h - r))}
        for r in range(0, h, th)
        for c in range(0, w, tw)
    ]


def unknown_image_message(image_id: Any, studies: str | Path) -> str:
    """What a server answers (HTTP 400) for an image or slide id that is neither a file nor in its studies folder."""
    return (
        f"no image or slide {image_id!r} in the studies folder {studies}: an id is a file name there without its "
        "extension (GET /datastore/?output=all lists them), or give the path of a file on the server"
    )


def is_region_request(request: Mapping[str, Any]) -> bool:
    """Whether a MONAI Label request is for a region of a slide (the slide task) rather than a whole image (the
    bundle's image task): it names a ``location`` or a ``size`` (as ``/infer/wsi_v2`` tiles and region requests do),
    or its image is a slide file (:data:`~monai_wsl.data.SLIDE_SUFFIXES`), which only the slide task reads."""
    if request.get("location") is not None or request.get("size") is not None:
        return True
    image = request.get("image")
    return isinstance(image, (str, Path)) and Path(image).suffix.lower() in SLIDE_SUFFIXES
