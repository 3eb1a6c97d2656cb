"""Whole-slide images: listing and checking slides, the tissue mask, and the files a slide's map is handed on in
(a pyramidal tiled TIFF, GeoJSON polygons, a thumbnail).

Slides are read through MONAI's :class:`~monai.data.WSIReader` (OpenSlide for SVS / NDPI / MRXS / tiled TIFF, cuCIM
where installed). Everything here works region by region or on a low-resolution level, so that a slide of any size
is handled in bounded memory.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from .check import DataError

__all__ = [
    "SLIDE_SUFFIXES",
    "list_slides",
    "open_slide",
    "opened_slide",
    "choose_level",
    "otsu_threshold",
    "tissue_mask",
    "downsample_mean",
    "ZeroMap",
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
        slides = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES)
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


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of values in [0, 1]: the cut that maximises the between-class variance."""
    hist, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    hist = hist.astype(np.float64)
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centers)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(edges[int(np.argmax(between)) + 1])


def tissue_mask(rgb: np.ndarray, min_saturation: float = 0.07) -> tuple[np.ndarray, float]:
    """Tissue on a low-resolution ``(H, W, 3)`` uint8 image: Otsu's threshold on the saturation (glass is white or
    grey, stained tissue is coloured), never below ``min_saturation`` so that an empty slide has no tissue. Returns
    the ``(H, W)`` bool mask and the threshold used."""
    rgb = np.asarray(rgb)[..., :3]
    high, low = rgb.max(-1).astype(np.float32), rgb.min(-1).astype(np.float32)
    saturation = (high - low) / np.maximum(high, 1.0)
    threshold = max(otsu_threshold(saturation), min_saturation)
    return saturation > threshold, threshold


def downsample_mean(source: Any, factor: int, tile: int = 2048, out: Any = None) -> Any:
    """``source`` (``(H, W)``, a NumPy or zarr array; NaN counts as 0) averaged over ``factor x factor`` blocks,
    read about ``tile x tile`` source pixels at a time into ``out`` (a new NumPy array when not given; a zarr array
    keeps a large result on disk): the memory used is that of a few such blocks, whatever the map's size and the
    factor."""
    h, w = source.shape[-2:]
    oh, ow = -(-h // factor), -(-w // factor)
    out = np.zeros((oh, ow), np.float32) if out is None else out
    step = max(1, tile // factor)  # output pixels a block
    for y in range(0, oh, step):
        for x in range(0, ow, step):
            block = np.array(source[y * factor : (y + step) * factor, x * factor : (x + step) * factor], np.float32)
            np.nan_to_num(block, copy=False)
            bh, bw = -(-block.shape[0] // factor), -(-block.shape[1] // factor)
            pad = ((0, bh * factor - block.shape[0]), (0, bw * factor - block.shape[1]))
            sums = np.pad(block, pad).reshape(bh, factor, bw, factor).sum((1, 3))
            rows = np.minimum(factor, block.shape[0] - factor * np.arange(bh))  # pixels of each output row / col
            cols = np.minimum(factor, block.shape[1] - factor * np.arange(bw))
            out[y : y + bh, x : x + bw] = sums / np.outer(rows, cols)
    return out


class ZeroMap:
    """An ``(H, W)`` map of zeros that holds no memory: the map of a slide where nothing ran."""

    def __init__(self, shape: tuple[int, int]) -> None:
        self.shape = tuple(shape)

    def __getitem__(self, index: tuple) -> np.ndarray:
        sizes = [len(range(*s.indices(n))) for s, n in zip(index, self.shape)]
        return np.zeros(sizes, np.float32)


#: levels of more pixels than this are computed into zarr arrays on disk when the map itself is on disk
_IN_MEMORY_PIXELS = 2**24


def _levels(source: Any, tile: int, workdir: str | None = None) -> Iterator[Any]:
    """The map itself, then halvings (2 x 2 means) until a level fits in one tile, each computed from the previous
    one by tiles. With a ``workdir``, large levels are zarr arrays there, so memory stays bounded on any map."""
    level = source
    yield level
    while max(level.shape[-2:]) > tile:
        shape = (-(-level.shape[-2] // 2), -(-level.shape[-1] // 2))
        out = None
        if workdir is not None and shape[0] * shape[1] > _IN_MEMORY_PIXELS:
            import zarr

            out = zarr.open_array(
                os.path.join(workdir, f"level{shape[0]}x{shape[1]}.zarr"),
                mode="w",
                shape=shape,
                chunks=(1024, 1024),
                dtype="float32",
            )
        level = downsample_mean(level, 2, out=out)
        yield level


def _tiles(level: Any, tile: int, scale: float) -> Iterator[np.ndarray]:
    h, w = level.shape[-2:]
    for y in range(0, h, tile):
        for x in range(0, w, tile):
            block = np.nan_to_num(np.asarray(level[y : y + tile, x : x + tile], dtype=np.float32))
            out = np.zeros((tile, tile), np.uint8)
            out[: block.shape[0], : block.shape[1]] = np.clip(np.rint(block * scale), 0, 255).astype(np.uint8)
            yield out


def write_pyramid_tiff(
    path: str | Path,
    source: Any,
    tile: int = 256,
    mpp: float | None = None,
    scale: float = 255.0,
    workdir: str | None = None,
) -> list[tuple[int, int]]:
    """Write a probability map (``(H, W)`` in [0, 1], NumPy or zarr; NaN = not run = 0) as a pyramidal tiled TIFF:
    8-bit (``round(p * scale)``), deflate-compressed, 256-pixel tiles, one page per level (the full map, then
    halvings, marked as reduced-resolution pages), the layout QuPath, ASAP and OpenSlide open. Written tile by tile;
    with a ``workdir`` (for a map on disk), the large halvings are kept there too. ``mpp``: the map's microns per
    pixel, written as the pages' resolution. Returns the levels' ``(height, width)``."""
    import tifffile

    resolution = {}
    shapes = []
    with tifffile.TiffWriter(path, bigtiff=source.shape[-2] * source.shape[-1] > 2**31) as tif:
        for i, level in enumerate(_levels(source, tile, workdir)):
            h, w = level.shape[-2:]
            if mpp:
                pixel = mpp * (source.shape[-1] / w) * 1e-4  # cm
                resolution = {"resolution": (1 / pixel, 1 / pixel), "resolutionunit": "CENTIMETER"}
            tif.write(
                _tiles(level, tile, scale),
                shape=(h, w),
                dtype=np.uint8,
                tile=(tile, tile),
                compression="zlib",
                photometric="minisblack",
                subfiletype=1 if i else 0,
                metadata=None,
                **resolution,
            )
            shapes.append((h, w))
    return shapes


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
            h, w = level.shape[0] // 2 * 2, level.shape[1] // 2 * 2
            level = level[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).mean((1, 3)).round().astype(np.uint8)
            factor *= 2


def _ring_area(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def mask_to_geojson(
    mask: np.ndarray,
    downsample: float,
    name: str = "region",
    min_area: float = 0.0,
    tolerance: float = 0.5,
    properties: dict | None = None,
) -> dict:
    """The regions of a binary ``(H, W)`` mask as a GeoJSON ``FeatureCollection`` of polygons (with holes) in level-0
    pixel coordinates (x right, y down; a mask pixel ``(r, c)`` covers ``[c, c+1) x [r, r+1)`` times
    ``downsample``), as QuPath imports them (``objectType: annotation``, classification ``name``). Exteriors run
    counter-clockwise and holes clockwise in these coordinates; rings are simplified within ``tolerance`` mask pixels.
    Regions smaller than ``min_area`` level-0 pixels are left out."""
    from skimage.measure import approximate_polygon, find_contours, label, regionprops

    features = []
    # edge-connected regions, as find_contours traces them (two regions touching at a corner are two polygons)
    labels = label(np.asarray(mask, bool), connectivity=1)
    for region in regionprops(labels):
        r0, c0, r1, c1 = region.bbox
        component = np.pad(labels[r0:r1, c0:c1] == region.label, 1)
        rings = []
        for contour in find_contours(component.astype(np.float32), 0.5):
            contour = approximate_polygon(contour, tolerance) if tolerance else contour
            # (row, col) at pixel centres -> (x, y) pixel edges, level 0
            xy = np.stack([contour[:, 1] - 1 + c0 + 0.5, contour[:, 0] - 1 + r0 + 0.5], 1) * downsample
            if len(xy) >= 4 and abs(_ring_area(xy)) > 0:
                rings.append(xy)
        if not rings:
            continue
        rings.sort(key=lambda r: -abs(_ring_area(r)))
        exterior, holes = rings[0], rings[1:]
        if abs(_ring_area(exterior)) < min_area:
            continue
        exterior = exterior if _ring_area(exterior) > 0 else exterior[::-1]
        holes = [h if _ring_area(h) < 0 else h[::-1] for h in holes]
        coordinates = [np.round(r, 2).tolist() for r in [exterior, *holes]]
        for ring in coordinates:
            if ring[0] != ring[-1]:
                ring.append(ring[0])
        features.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": coordinates},
                "properties": {
                    "objectType": "annotation",
                    "classification": {"name": name, "color": [0, 166, 166]},
                    "area_px": round(abs(_ring_area(exterior)) - sum(abs(_ring_area(h)) for h in holes), 1),
                    **(properties or {}),
                },
            }
        )
    return {"type": "FeatureCollection", "features": features}
