"""Whole-slide images: listing, opening and checking slides, their tissue, and slides written as scanners write them.
The files a slide's map is handed on in are :mod:`monai_wsl.data.slide_outputs`' (re-exported here).

Slides are read through MONAI's :class:`~monai.data.WSIReader` (OpenSlide for SVS / NDPI / MRXS / tiled TIFF, cuCIM
where installed). Everything here works region by region or on a low-resolution level, so that a slide of any size
is handled in bounded memory.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np

from .check import DataError, writable_problem
from .slide_outputs import ArrayPlane, ZeroMap, downsample_mean, mask_to_geojson, write_pyramid_tiff

__all__ = [
    "SLIDE_SUFFIXES",
    "list_slides",
    "open_slide",
    "opened_slide",
    "choose_level",
    "read_region",
    "slide_problems",
    "otsu_threshold",
    "tissue_mask",
    "find_tissue",
    "survey_slide",
    "downsample_mean",
    "ZeroMap",
    "ArrayPlane",
    "write_pyramid_tiff",
    "write_rgb_pyramid",
    "mask_to_geojson",
]

logger = logging.getLogger(__name__)

#: slide formats OpenSlide reads (and tiled TIFFs)
SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide")


def list_slides(source: str | Path | Sequence[str | Path]) -> list[Path]:
    """The slides of a run: a folder (its files with a slide suffix, sorted), a CSV (a column ``slide``, ``image`` or
    ``path``, or else the first column; relative paths from the CSV's folder), a text file (one path a line), one
    slide, or a list of paths. Missing files are returned as given: :func:`open_slide` names them."""
    if isinstance(source, (list, tuple)):
        return [Path(s) for s in source]
    path = Path(source)
    if path.is_dir():
        named_like_slides = sorted(p for p in path.iterdir() if p.suffix.lower() in SLIDE_SUFFIXES)
        skipped = [p.name for p in named_like_slides if not p.is_file()]
        if skipped:
            logger.warning(
                f"{path}: {', '.join(skipped)} named like a slide but not a file (a folder?): skipped. The run reads "
                "the slide files directly in the folder given; list others in a CSV or text file (--dataset_dir)."
            )
        slides = [p for p in named_like_slides if p.is_file()]
        if not slides:
            raise DataError(
                [f"folder {path} holds no slide ({', '.join(SLIDE_SUFFIXES)}): pass --dataset_dir FOLDER_OF_SLIDES"],
                "the run's inputs",
            )
        return slides
    if path.suffix.lower() == ".csv" and path.is_file():
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
        if not rows:
            raise DataError([f"{path} is empty: one slide path a row, under a header 'slide'"], "the run's inputs")
        header = [h.strip().lower() for h in rows[0]]
        column = next((header.index(c) for c in ("slide", "image", "path") if c in header), None)
        body = rows[1:] if column is not None else rows
        column = column or 0
        return [_relative(path, row[column].strip()) for row in body if row and row[column].strip()]
    if path.suffix.lower() == ".txt" and path.is_file():
        lines = [line.strip() for line in path.read_text().splitlines()]
        return [_relative(path, line) for line in lines if line and not line.startswith("#")]
    return [path]


def _relative(listing: Path, entry: str) -> Path:
    p = Path(entry)
    return p if p.is_absolute() else listing.parent / p


def open_slide(path: str | Path, backend: str = "openslide") -> tuple[Any, Any]:
    """``(reader, wsi)`` for one slide through MONAI's ``WSIReader``, or a :class:`DataError` that names the file:
    missing, a folder, or not a slide the backend reads."""
    from monai.data import WSIReader

    path = Path(path)
    if not path.exists():
        raise DataError([f"slide {path} does not exist: check the path (relative paths are from the current folder)"])
    if not path.is_file():
        raise DataError([f"slide {path} is a folder, not a slide file"])
    try:
        reader = WSIReader(backend=backend)
    except Exception as e:  # the backend's library is missing
        raise DataError(
            [f"the WSIReader backend {backend!r} cannot be used ({e}): pip install openslide-bin openslide-python"]
        ) from e
    try:
        wsi = reader.read(str(path))
        reader.get_size(wsi, 0)
    except Exception as e:
        raise DataError(
            [
                f"slide {path} cannot be read by {backend} ({type(e).__name__}: {e}): it is not a slide, is damaged, "
                "or is a format this backend does not read (OpenSlide reads SVS, NDPI, MRXS, SCN and tiled TIFF)"
            ]
        ) from e
    return reader, wsi


@contextmanager
def opened_slide(path: str | Path, backend: str = "openslide") -> Iterator[tuple[Any, Any]]:
    """:func:`open_slide` for a ``with`` block: ``(reader, wsi)``, the slide's handle closed when the block ends (a
    long-running server or a pipeline over hundreds of slides keeps no handle it no longer reads)."""
    reader, wsi = open_slide(path, backend)
    try:
        yield reader, wsi
    finally:
        close = getattr(wsi, "close", None)
        if close is not None:
            close()


def choose_level(reader: Any, wsi: Any, path: str | Path, level: int | None = None, mpp: float | None = None) -> int:
    """The slide's level to run at: ``level`` as given (checked), or the level whose microns per pixel are nearest
    ``mpp`` (within 25 %, else an error that lists the slide's levels)."""
    n = reader.get_level_count(wsi)
    sizes = ", ".join(f"{i}: {tuple(reader.get_size(wsi, i))[::-1]}" for i in range(n))
    if mpp is None:
        level = 0 if level is None else int(level)
        if not 0 <= level < n:
            raise DataError(
                [f"slide {path} has no level {level}: it has {n} level(s) (width x height: {sizes}); pass --level"]
            )
        return level
    try:
        mpps = [float(np.mean(reader.get_mpp(wsi, i))) for i in range(n)]
    except Exception as e:
        raise DataError(
            [f"slide {path} has no microns-per-pixel in its metadata ({e}): pass --level instead of --mpp"]
        ) from e
    best = int(np.argmin([abs(m - mpp) for m in mpps]))
    if abs(mpps[best] - mpp) > 0.25 * mpp:
        listed = ", ".join(f"{i}: {m:.3g}" for i, m in enumerate(mpps))
        raise DataError([f"slide {path} has no level near {mpp} microns per pixel (its levels: {listed})"])
    return best


def read_region(
    path: str | Path,
    location: Sequence[int],
    size: Sequence[int],
    level: int | None = 0,
    mpp: float | None = None,
    backend: str = "openslide",
    opened: tuple[Any, Any] | None = None,
) -> np.ndarray:
    """The ``(C, height, width)`` region of a slide at ``location`` ``(x, y)`` (level-0 pixels), ``size`` ``(width,
    height)`` in pixels of ``level`` (or of the level nearest ``mpp``, :func:`choose_level`); pixels beyond the slide
    are glass (white). The slide is opened for this read only (a long-running server keeps no handle), unless
    ``opened`` is its ``(reader, wsi)`` already open (left open)."""
    with opened_slide(path, backend) if opened is None else nullcontext(opened) as (reader, wsi):
        level = choose_level(reader, wsi, path, level, mpp)
        image, _ = reader.get_data(
            wsi, location=(int(location[1]), int(location[0])), size=(int(size[1]), int(size[0])), level=level
        )
        image = np.array(image)
        h, w = reader.get_size(wsi, level)
        downsample = float(reader.get_downsample_ratio(wsi, level))
    inside_h = max(0, min(int(size[1]), h - round(location[1] / downsample)))
    inside_w = max(0, min(int(size[0]), w - round(location[0] / downsample)))
    image[:, inside_h:, :] = 255
    image[:, :, inside_w:] = 255
    return image


def slide_problems(
    slides: Sequence[str | Path],
    backend: str = "openslide",
    level: int | None = 0,
    mpp: float | None = None,
    patch_size: int = 512,
    min_patch_size: int = 1,
    output_dir: str | Path | None = None,
) -> list[str]:
    """What keeps a whole-slide run from starting, each naming its file: a slide that cannot be opened, has no such
    level or a level smaller than a patch; a patch smaller than the network's ``min_patch_size``; an output folder
    that cannot be written; two slides of one name (their outputs would overwrite each other)."""
    problems = []
    for slide in slides:
        try:
            with opened_slide(slide, backend) as (reader, wsi):
                chosen = choose_level(reader, wsi, slide, level, mpp)
                h, w = reader.get_size(wsi, chosen)
            if min(h, w) < patch_size:
                problems.append(
                    f"slide {slide}: level {chosen} is {w} x {h} pixels, smaller than a patch ({patch_size}): "
                    "pass a smaller --patch_size or a finer --level"
                )
        except DataError as e:
            problems += e.problems
    if patch_size < min_patch_size:
        problems.append(f"patch_size {patch_size} is under the network's minimum {min_patch_size}")
    writable = writable_problem(output_dir) if output_dir is not None else None
    problems += [writable] if writable else []
    stems = [Path(s).stem for s in slides]
    problems += [
        f"two slides are named {s!r}: their outputs would overwrite each other"
        for s in sorted({s for s in stems if stems.count(s) > 1})
    ]
    return problems


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of values in [0, 1] (scikit-image's ``threshold_otsu``) on a histogram of ``bins`` bins over
    [0, 1]: the upper edge of the last bin of the lower class. Values in fewer than two bins: the first bin's edge.
    (scikit-image sums the counts in float32: on two cuts whose between-class variances agree to about 1e-7, it may
    pick the other one, a bin away.)"""
    from skimage.filters import threshold_otsu

    counts, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    used = np.flatnonzero(counts)
    if len(used) < 2:
        return float(edges[1])
    # the histogram from its first to its last non-empty bin (scikit-image's class means are undefined on empty
    # ends), each bin named by its upper edge: the threshold is that edge
    low, high = used[0], used[-1] + 1
    return float(threshold_otsu(hist=(counts[low:high], edges[low + 1 : high + 1])))


def tissue_mask(rgb: np.ndarray, min_saturation: float = 0.07) -> tuple[np.ndarray, float]:
    """Tissue on a low-resolution ``(H, W, 3)`` uint8 image: Otsu's threshold on the saturation (glass is white or
    grey, stained tissue is coloured), never below ``min_saturation`` so that an empty slide has no tissue. Returns
    the ``(H, W)`` bool mask and the threshold used."""
    rgb = np.asarray(rgb)[..., :3]
    high, low = rgb.max(-1).astype(np.float32), rgb.min(-1).astype(np.float32)
    saturation = (high - low) / np.maximum(high, 1.0)
    threshold = max(otsu_threshold(saturation), min_saturation)
    return saturation > threshold, threshold


def find_tissue(
    reader: Any, wsi: Any, path: str | Path, patch_level0: float, min_side: int = 1024, min_saturation: float = 0.07
) -> tuple[np.ndarray, np.ndarray, float, float]:
    """The tissue of a slide, found on a low-resolution picture: the smallest level of at least ``min_side`` pixels
    on its long side (else the largest level), brought down (bilinear) to no finer than 1024 pixels on the long side
    or 8 pixels a patch side (``patch_level0``: a patch's side in level-0 pixels), whichever is finer: enough to
    place every patch, and cheap on a slide whose lowest level is large. Returns the ``(h, w, 3)`` picture, its
    :func:`tissue_mask`, its downsample (level-0 pixels per pixel) and the saturation threshold used."""
    n = reader.get_level_count(wsi)
    lowest = next((i for i in reversed(range(n)) if max(reader.get_size(wsi, i)) >= min_side), 0)
    h, w = reader.get_size(wsi, lowest)
    if h * w > 2**26:
        raise DataError(
            [
                f"slide {path} has no low-resolution level (its smallest is {w} x {h}): save it as a pyramidal "
                "tiled TIFF (e.g. vips tiffsave --tile --pyramid) so that the tissue can be found"
            ]
        )
    rgb, _ = reader.get_data(wsi, location=(0, 0), size=(h, w), level=lowest)
    rgb = np.moveaxis(np.asarray(rgb), 0, -1)[..., :3]
    downsample = float(reader.get_downsample_ratio(wsi, lowest))
    wanted = min(max(h, w) * downsample / 1024, patch_level0 / 8)  # level-0 pixels
    if wanted > downsample * 1.25:
        from PIL import Image

        factor = wanted / downsample
        size = (max(1, round(w / factor)), max(1, round(h / factor)))
        rgb = np.asarray(Image.fromarray(np.ascontiguousarray(rgb)).resize(size, Image.BILINEAR))
        downsample *= w / size[0]
    mask, threshold = tissue_mask(rgb, min_saturation)
    return rgb, mask, downsample, threshold


def survey_slide(
    path: str | Path,
    backend: str = "openslide",
    level: int | None = 0,
    mpp: float | None = None,
    patch_size: int = 512,
    min_side: int = 1024,
    min_saturation: float = 0.07,
) -> dict:
    """Open a slide and find what a run over it needs: the ``level`` to run at (:func:`choose_level`), its
    ``level_downsample`` and ``mpp`` (None when the slide does not say), the slide's ``size_level0`` ``(width,
    height)``, and :func:`find_tissue`'s ``thumbnail``, ``tissue`` mask, ``saturation`` threshold and
    ``tissue_downsample`` (for patches of ``patch_size`` pixels of the level run)."""
    with opened_slide(path, backend) as (reader, wsi):
        level = choose_level(reader, wsi, path, level, mpp)
        level_downsample = float(reader.get_downsample_ratio(wsi, level))
        h0, w0 = reader.get_size(wsi, 0)
        thumb, tissue, tissue_downsample, saturation = find_tissue(
            reader, wsi, path, patch_size * level_downsample, min_side, min_saturation
        )
        try:
            level_mpp: float | None = float(np.mean(reader.get_mpp(wsi, level)))
        except Exception:
            level_mpp = None
    return {
        "level": level,
        "level_downsample": level_downsample,
        "mpp": level_mpp,
        "size_level0": (int(w0), int(h0)),
        "thumbnail": thumb,
        "tissue": tissue,
        "saturation": saturation,
        "tissue_downsample": tissue_downsample,
    }


def _halve(rgb: np.ndarray, band: int = 1024) -> np.ndarray:
    """2 x 2 means of an ``(H, W, 3)`` uint8 image (an odd last row or column dropped), rounded half to even, computed
    ``band`` output rows at a time in float32 (exact for four 8-bit values), where float64 means of the whole image
    and their rounding took four times the image's own memory more."""
    h, w = rgb.shape[0] // 2, rgb.shape[1] // 2
    out = np.empty((h, w, 3), np.uint8)
    for y in range(0, h, band):
        rows = rgb[2 * y : 2 * min(y + band, h), : 2 * w].reshape(-1, 2, w, 2, 3)
        out[y : y + band] = rows.mean((1, 3), dtype=np.float32).round()
    return out


def write_rgb_pyramid(path: str | Path, rgb: np.ndarray, tile: int = 256, mpp: float | None = 0.5) -> list:
    """An ``(H, W, 3)`` uint8 image as a pyramidal tiled TIFF the way scanners write slides (one page a level,
    halving by 2 x 2 means until the long side is at most 512, deflate, the pixel size): OpenSlide reads it as a
    slide. Returns the levels' ``(height, width)``."""
    import tifffile

    shapes = []
    level = np.asarray(rgb, np.uint8)
    with tifffile.TiffWriter(path, bigtiff=level.nbytes > 2**31) as tif:
        factor = 1
        while True:
            res = {"resolution": (1e4 / (mpp * factor),) * 2, "resolutionunit": "CENTIMETER"} if mpp else {}
            tif.write(
                level,
                tile=(tile, tile),
                compression="zlib",
                photometric="rgb",
                subfiletype=1 if factor > 1 else 0,
                metadata=None,
                **res,
            )
            shapes.append(level.shape[:2])
            if max(level.shape[:2]) <= 512:
                return shapes
            level = _halve(level)
            factor *= 2
