"""The files a slide's map is handed on in: a map as a pyramidal tiled TIFF (:func:`write_pyramid_tiff`, written
tile by tile from memory or disk), its regions as GeoJSON polygons (:func:`mask_to_geojson`), and a slide's run as
the files :class:`SlideWriter` names after the slide in an output folder:

- ``<stem>_map.tif``: the mask probability ``M`` (8-bit, ``round(255 M)``) as a pyramidal tiled TIFF;
- ``<stem>_uncertainty.tif`` (when there is an uncertainty map): the binary entropy (bits, 8-bit ``round(255 H)``),
  pyramidal like the map;
- ``<stem>_thumbnail.png``: the slide and the regions ``M >= threshold`` over it;
- ``<stem>.geojson``: the regions ``M >= threshold`` as polygons in level-0 pixels (QuPath imports them);
- ``<stem>.json``: the run's summary, with the entries of these files.

Each file is written under a temporary name and all are renamed when complete, the JSON last (an earlier run's JSON
is removed before the first rename). The JSON lists the other files with their sizes and the settings that made them:
a slide is complete when its JSON lists files that are all there at those sizes, made with the settings of the run at
hand (:func:`~monai_wsl.data.slide_records.slide_outputs_complete`); a rerun skips it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from monai_wsl.utils import atomic_write
from monai_wsl.visualize import slide_thumbnail

__all__ = [
    "downsample_mean",
    "ZeroMap",
    "ArrayPlane",
    "write_pyramid_tiff",
    "mask_to_geojson",
    "SlideWriter",
    "slide_output_paths",
    "run_summary",
    "class_summary",
    "UNCERTAINTY_WHAT",
]

#: what the uncertainty map holds, as the summary says it
UNCERTAINTY_WHAT = (
    "the binary entropy (bits) of each patch's mask averaged over four flips (none, horizontal, vertical, both), "
    "merged as the map (the mean where patches overlap); the map, regions and class probabilities are those flip "
    "averages"
)


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
            block = np.asarray(source[y * factor : (y + step) * factor, x * factor : (x + step) * factor], np.float32)
            block = torch.nan_to_num(torch.from_numpy(block), nan=0.0)
            # ceil_mode: a block cut by the map's edge is the mean of the pixels it has
            means = F.avg_pool2d(block[None, None], factor, ceil_mode=True)[0, 0].numpy()
            out[y : y + means.shape[0], x : x + means.shape[1]] = means
    return out


class ZeroMap:
    """An ``(H, W)`` map of zeros that holds no memory: the map of a slide where nothing ran."""

    def __init__(self, shape: tuple[int, int]) -> None:
        self.shape = tuple(shape)

    def __getitem__(self, index: tuple) -> np.ndarray:
        sizes = [len(range(*s.indices(n))) for s, n in zip(index, self.shape)]
        return np.zeros(sizes, np.float32)


class ArrayPlane:
    """The ``(H, W)`` plane ``channel`` of a ``(1, C, H, W)`` array (a merged map in zarr on disk), read by slices
    (never the whole array at once)."""

    def __init__(self, array: Any, channel: int = 0) -> None:
        self.array, self.channel = array, int(channel)
        self.shape = tuple(array.shape[-2:])

    def __getitem__(self, index: tuple) -> np.ndarray:
        return np.asarray(self.array[(0, self.channel, *index)])


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


def _ring_area(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def simplify_lines(lines: list[np.ndarray], tolerance: float) -> list[np.ndarray]:
    """Douglas-Peucker on every ``(K, 2)`` polyline of ``lines`` at once (GEOS, through shapely), each within
    ``tolerance``, its two ends kept; lines of fewer than 3 points, or ``tolerance`` 0, pass unchanged. It gives what
    scikit-image's ``approximate_polygon`` gives (the same vertices on most lines, within ``tolerance`` on all), two
    orders of magnitude faster on a slide's many regions."""
    import shapely

    todo = [i for i, line in enumerate(lines) if len(line) >= 3] if tolerance > 0 else []
    if not todo:
        return list(lines)
    sizes = [len(lines[i]) for i in todo]
    geometries = shapely.linestrings(
        np.concatenate([lines[i] for i in todo]), indices=np.repeat(np.arange(len(todo)), sizes)
    )
    xy, index = shapely.get_coordinates(
        shapely.simplify(geometries, tolerance, preserve_topology=False), return_index=True
    )
    out = list(lines)
    # by each line's index, so that a line simplified to nothing (an empty geometry, no coordinates) stays in its place
    for i, line in zip(todo, np.split(xy, np.cumsum(np.bincount(index, minlength=len(todo)))[:-1])):
        out[i] = line
    return out


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
    from skimage.measure import find_contours, label, regionprops

    # edge-connected regions, as find_contours traces them (two regions touching at a corner are two polygons)
    labels = label(np.asarray(mask, bool), connectivity=1)
    traced = []  # (region, its contours in the padded bounding box)
    for region in regionprops(labels):
        r0, c0, r1, c1 = region.bbox
        component = np.pad(labels[r0:r1, c0:c1] == region.label, 1)
        traced.append((region.bbox, find_contours(component.astype(np.float32), 0.5)))
    contours = [c for _, cs in traced for c in cs]
    contours = simplify_lines(contours, tolerance)
    features = []
    start = 0
    for (r0, c0, _, _), cs in traced:
        rings = []
        for contour in contours[start : start + len(cs)]:
            # (row, col) at pixel centres -> (x, y) pixel edges, level 0
            xy = np.stack([contour[:, 1] - 1 + c0 + 0.5, contour[:, 0] - 1 + r0 + 0.5], 1) * downsample
            if len(xy) >= 4 and abs(_ring_area(xy)) > 0:
                rings.append(xy)
        start += len(cs)
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


def slide_output_paths(output_dir: str | Path, stem: str, uncertainty: bool = False) -> dict[str, Path]:
    """``{kind: path}`` of a slide's files, in the order they are renamed into place (the JSON last)."""
    names = [("map", "_map.tif"), ("thumbnail", "_thumbnail.png"), ("geojson", ".geojson"), ("json", ".json")]
    if uncertainty:
        names.insert(1, ("uncertainty", "_uncertainty.tif"))
    return {k: Path(output_dir) / f"{stem}{suffix}" for k, suffix in names}


def run_summary(slide: Path, setup: dict, patch_size: int, overlap: float | int, merger: str) -> dict:
    """A summary's entries on the slide, the level and grid used and the patches run (``setup``: what
    :meth:`monai_wsl.inferers.SlideInferer.prepare` returns)."""
    plan = setup["plan"]
    overlap_px = round(patch_size * overlap) if isinstance(overlap, float) else int(overlap)
    return {
        "slide": str(slide.absolute()),
        "size_level0": list(setup["size_level0"]),
        "level": setup["level"],
        "level_downsample": setup["level_downsample"],
        "mpp": setup["mpp"],
        "patch_size": patch_size,
        "overlap": overlap,
        "stride": patch_size - overlap_px,
        "patches_total": len(plan["positions"]),
        "patches_run": len(plan["tissue_positions"]),
        "tissue_fraction": float(setup["tissue"].mean()),
        "tissue_saturation_threshold": setup["saturation"],
        "merger": merger,
    }


def class_summary(probs: np.ndarray, class_names: list[str], positive_class: int) -> dict:
    """A summary's slide-level class probabilities (``probs``: ``(patches run, classes)``) and how they were
    aggregated."""
    return {
        "class_names": class_names,
        "slide_probability": probs.mean(0).round(6).tolist() if len(probs) else None,
        "slide_max_probability": float(probs[:, positive_class].max()) if len(probs) else None,
        "aggregation": "slide_probability: the mean over the patches run of each patch's class probabilities; "
        f"slide_max_probability: the highest {class_names[positive_class]!r} probability of a patch",
    }


class SlideWriter:
    """Writes the files of a slide's run into ``output_dir`` (see the module).

    Args:
        threshold, region_name: the regions ``map >= threshold`` (GeoJSON, thumbnail) and their GeoJSON class.
        geojson_max_side: the map is averaged down to at most this many pixels a side for the regions and thumbnail.
        thumbnail_size: the thumbnail's long side at most.
    """

    def __init__(
        self,
        output_dir: str | Path,
        threshold: float = 0.5,
        region_name: str = "gland",
        geojson_max_side: int = 4096,
        thumbnail_size: int = 1024,
    ) -> None:
        self.output_dir, self.threshold, self.region_name = Path(output_dir), float(threshold), region_name
        self.geojson_max_side, self.thumbnail_size = int(geojson_max_side), int(thumbnail_size)

    def _regions(self, plane: Any, setup: dict, partial: dict) -> tuple[dict, int]:
        """Write the regions (GeoJSON) and the thumbnail, both from the map averaged down to at most
        ``geojson_max_side`` pixels a side; returns the GeoJSON and that factor."""
        factor = max(1, int(np.ceil(max(plane.shape) / self.geojson_max_side)))
        small = downsample_mean(plane, factor) if factor > 1 else np.nan_to_num(np.asarray(plane[:, :]))
        geojson = mask_to_geojson(small >= self.threshold, factor * setup["level_downsample"], self.region_name)
        partial["geojson"].write_text(json.dumps(geojson))
        thumbnail = slide_thumbnail(setup["thumbnail"], small, self.threshold, self.thumbnail_size)
        Image.fromarray(thumbnail).save(partial["thumbnail"], format="PNG", compress_level=1)
        return geojson, factor

    def write(
        self, stem: str, plane: Any, uncertain: Any, setup: dict, summary: tuple[dict, dict, float], workdir: str
    ) -> dict:
        """Write a slide's files and return its summary (the content of ``<stem>.json``): ``summary``'s
        :func:`run_summary`, then the entries of the map, the uncertainty map and the regions, then its
        :func:`class_summary`, then the seconds since its start (a ``time.perf_counter()``).

        Args:
            plane, uncertain: the ``(H, W)`` map and uncertainty map (NumPy, :class:`ArrayPlane` or :class:`ZeroMap`)
                of the level run; ``uncertain`` None: no uncertainty file (an earlier run's is removed).
            setup: the run's plan (:meth:`monai_wsl.inferers.SlideInferer.prepare`): the map's ``level_downsample``
                (level-0 pixels per pixel) and ``mpp``, and the slide's low-resolution ``thumbnail`` picture.
            workdir: a folder for the large levels of a map on disk.
        """
        run, classes, start = summary
        level_downsample, mpp = setup["level_downsample"], setup["mpp"]
        outputs = slide_output_paths(self.output_dir, stem, uncertain is not None)
        with atomic_write(*outputs.values()) as temporary:  # the JSON last: it marks a finished slide
            partial = dict(zip(outputs, temporary))
            # the pyramids in a thread (their compression and means leave the GIL) while this one traces the
            # regions and draws the thumbnail: on 2 cores the files take about the time of the longer of the two
            with ThreadPoolExecutor(1, thread_name_prefix="pyramid") as pool:
                tiffs = [pool.submit(write_pyramid_tiff, partial["map"], plane, mpp=mpp, workdir=workdir)]
                if uncertain is not None:
                    tiffs.append(
                        pool.submit(write_pyramid_tiff, partial["uncertainty"], uncertain, mpp=mpp, workdir=workdir)
                    )
                geojson, factor = self._regions(plane, setup, partial)
                levels = [t.result() for t in tiffs][0]  # a pyramid's error is raised here
            summary = {
                **run,
                "map": {
                    "file": outputs["map"].name,
                    "levels": [list(s) for s in levels],
                    "scale": 255,
                    "downsample_level0": level_downsample,
                },
                "uncertainty": {"file": outputs["uncertainty"].name, "what": UNCERTAINTY_WHAT, "scale": 255}
                if uncertain is not None
                else None,
                "regions": {
                    "file": outputs["geojson"].name,
                    "count": len(geojson["features"]),
                    "threshold": self.threshold,
                    "downsample_level0": factor * level_downsample,
                },
                **classes,
                "seconds": round(time.perf_counter() - start, 2),
                # what completes the slide: each file and its size (see slide_records.slide_outputs_complete)
                "files": {outputs[k].name: partial[k].stat().st_size for k in outputs if k != "json"},
            }
            partial["json"].write_text(json.dumps(summary, indent=1))
            # an earlier run's JSON goes before any new file is renamed into place: a run stopped between the
            # renames leaves new files without a JSON (an unfinished slide, redone), never beside an old JSON
            outputs["json"].unlink(missing_ok=True)
        if uncertain is None:  # an earlier run's, which this slide's JSON no longer describes
            (self.output_dir / f"{stem}_uncertainty.tif").unlink(missing_ok=True)
        return summary


def __getattr__(name: str) -> Any:
    from . import slide_records  # the records and table of many slides moved there; importable here

    if name in slide_records.__all__:
        return getattr(slide_records, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
