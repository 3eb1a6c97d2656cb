"""CAMELYON16 release -> CAMELYON16-P512 patches (normal vs metastatic) and their MONAI datalist.

The protocol (Rony et al., MELBA 2023, as used by Belharbi et al., IEEE TMI 2022; ../docs/METHOD.md section 3):
square patches of ``patch_size`` (512) pixels at level 0, on a grid without overlap, the split made at slide level.

- Tissue: Otsu's threshold on the saturation (:func:`monai_wsl.data.tissue_mask`) of the coarsest level that still
  has at least 8 pixels a patch side (level 6 of a CAMELYON16 slide for 512 px patches); a patch's tissue fraction is
  the area of that mask over the patch, at level-0 resolution (each mask pixel covers its exact level-0 area).
- Metastatic fraction ``p``: the share of the patch's level-0 pixels inside the lesion annotation
  (:func:`rasterize_annotation`).
- Metastatic patches (tumour slides): tissue >= ``min_tissue`` (0.1) and ``p >= min_metastatic`` (0.2); all those
  with ``p <= 0.5`` are kept, and of those with ``p > 0.5`` a seeded random subset of at most ``high_ratio`` (1.0)
  times as many as the kept ``p <= 0.5`` ones of the same slide (at least one): the "calibrated" subsampling, which
  keeps the masks from being mostly full.
- Normal patches: drawn at random (seeded) from the tissue patches (tissue >= ``min_tissue``) of the normal slides of
  each split, as many as that split's metastatic patches, shared evenly among its normal slides.

Every function that meets a bad input raises :class:`~monai_wsl.data.DataError` naming the file and the fix.
This module holds the protocol's parts (the release, the annotations and their rasteriser, the tissue, the sampling);
:mod:`monai_wsl.apps.camelyon16` runs the whole pipeline over a release (resumable, in parallel), and
``scripts/prepare_camelyon16.py`` is its command line.
"""

from __future__ import annotations

import csv
import logging
import xml.etree.ElementTree as ET
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .check import DataError

__all__ = [
    "CAMELYON16_CLASS_NAMES",
    "EXCLUDED_SLIDES",
    "C16Slide",
    "find_camelyon16_slides",
    "read_asap_annotation",
    "check_annotation_on_slide",
    "fill_polygon",
    "rasterize_annotation",
    "polygon_boxes",
    "choose_tissue_level",
    "patch_area_fractions",
    "select_metastatic",
    "normal_quotas",
    "select_normal",
    "rng_for",
]

logger = logging.getLogger(__name__)

CAMELYON16_CLASS_NAMES = ("normal", "metastatic")
#: test_114: its annotation is flawed (the survey's protocol leaves it out)
EXCLUDED_SLIDES = ("test_114",)
#: ASAP groups of the CAMELYON16 annotations: _0 and _1 are tumour, _2 non-tumour areas inside tumour (subtracted)
TUMOUR_GROUPS = ("_0", "_1", "tumor", "metastases")
EXCLUDED_GROUPS = ("_2", "exclusion", "non-tumor")
_POLYGON_TYPES = ("polygon", "spline", "rectangle")

_LAYOUT = (
    "expected the CAMELYON16 release layout: training/normal/normal_NNN.tif, training/tumor/tumor_NNN.tif, "
    "training/lesion_annotations/tumor_NNN.xml, testing/images/test_NNN.tif, testing/lesion_annotations/test_NNN.xml "
    "and testing/reference.csv"
)


@dataclass(frozen=True)
class C16Slide:
    """One slide of the release: ``name`` (``tumor_001``), its file, its label (0 normal, 1 tumour), where it comes
    from (``training`` or ``testing``) and its ASAP annotation (tumour slides)."""

    name: str
    path: Path
    label: int
    source: str
    annotation: Path | None = None


def _slides_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in (".tif", ".tiff"))


def _annotations_in(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        return {}
    return {p.stem.lower(): p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix.lower() == ".xml"}


def _read_reference(path: Path) -> tuple[dict[str, int], list[str]]:
    """``{slide name (lower case): label}`` of ``testing/reference.csv`` (``Test_001,Tumor,Macro,...`` rows, with or
    without a header), and the problems found."""
    labels, problems = {}, []
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = [[v.strip() for v in row] for row in csv.reader(f) if any(v.strip() for v in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        return {}, [f"{path} cannot be read ({type(e).__name__}: {e}): download it again"]
    for i, row in enumerate(rows, 1):
        if len(row) < 2:
            problems.append(f"{path} row {i} has {len(row)} value(s), expected 'test_NNN,Normal|Tumor,...'")
            continue
        name, cls = Path(row[0]).stem.lower(), row[1].lower()
        if i == 1 and cls not in ("normal", "tumor"):
            continue  # a header
        if cls not in ("normal", "tumor"):
            problems.append(f"{path} row {i}: {row[0]} has class {row[1]!r}, expected Normal or Tumor")
            continue
        labels[name] = int(cls == "tumor")
    if not labels and not problems:
        problems.append(f"{path} lists no slide: expected rows 'test_NNN,Normal|Tumor,...'")
    return labels, problems


def find_camelyon16_slides(src: str | Path, exclude: Sequence[str] = EXCLUDED_SLIDES) -> list[C16Slide]:
    """The slides of a CAMELYON16 release folder, their labels and annotations, in a fixed order (training normal,
    training tumour, testing; by name). ``exclude``: slide names left out (``test_114`` by default).

    Raises:
        DataError: every problem found, each naming its file: no release layout, a tumour slide without its
            annotation, a test slide that ``testing/reference.csv`` does not list, an unreadable reference CSV.
    """
    src = Path(src).expanduser().resolve()
    if not src.is_dir():
        raise DataError([f"CAMELYON16 folder {src} does not exist or is not a folder: pass --src CAMELYON16_DIR"])
    excluded = {e.lower() for e in exclude}
    slides: list[C16Slide] = []
    problems: list[str] = []
    folders = {
        "normal": src / "training" / "normal",
        "tumor": src / "training" / "tumor",
        "test": src / "testing" / "images",
    }
    if not any(f.is_dir() for f in folders.values()):
        raise DataError([f"{src} holds none of training/normal, training/tumor, testing/images: {_LAYOUT}"])
    if folders["normal"].is_dir():
        slides += [C16Slide(p.stem, p, 0, "training") for p in _slides_in(folders["normal"])]
    if folders["tumor"].is_dir():
        slides += _tumour_slides(src, folders["tumor"], problems)
    if folders["test"].is_dir():
        slides += _test_slides(src, folders["test"], excluded, problems)
    slides = [s for s in slides if s.name.lower() not in excluded]
    names: dict[str, Path] = {}
    for s in slides:
        if s.name.lower() in names:
            problems.append(f"two slides are named {s.name}: {names[s.name.lower()]} and {s.path}; keep one")
        names[s.name.lower()] = s.path
    if not slides and not problems:
        problems.append(f"no slide (.tif) in {src}: {_LAYOUT}")
    if problems:
        raise DataError(problems, f"the CAMELYON16 release ({src})")
    return slides


def _tumour_slides(src: Path, folder: Path, problems: list[str]) -> list[C16Slide]:
    """The training tumour slides with their annotations; a slide without one is a problem."""
    slides = []
    notes = _annotations_in(src / "training" / "lesion_annotations")
    for p in _slides_in(folder):
        xml = notes.get(p.stem.lower())
        if xml is None:
            problems.append(
                f"tumour slide {p} has no annotation {src / 'training' / 'lesion_annotations' / (p.stem + '.xml')}"
                ": copy the release's lesion_annotations folder there (unzip lesion_annotations.zip) or remove "
                "the slide"
            )
        slides.append(C16Slide(p.stem, p, 1, "training", xml))
    return slides


def _test_slides(src: Path, folder: Path, excluded: set[str], problems: list[str]) -> list[C16Slide]:
    """The test slides, labelled by ``testing/reference.csv``, with the tumour slides' annotations."""
    slides = []
    reference = src / "testing" / "reference.csv"
    if not reference.is_file():
        problems.append(
            f"{reference} not found: the test slides' labels come from the release's reference.csv "
            "(rows 'test_NNN,Normal|Tumor,...'); copy it there"
        )
        labels = {}
    else:
        labels, bad = _read_reference(reference)
        problems += bad
    notes = _annotations_in(src / "testing" / "lesion_annotations")
    for p in _slides_in(folder):
        if p.stem.lower() in excluded:
            continue
        label = labels.get(p.stem.lower())
        if label is None:
            if reference.is_file() and labels:
                problems.append(f"test slide {p} is not listed in {reference}: add its row or remove the slide")
            continue
        xml = notes.get(p.stem.lower()) if label else None
        if label and xml is None:
            problems.append(
                f"test slide {p} is Tumor in {reference} but has no annotation "
                f"{src / 'testing' / 'lesion_annotations' / (p.stem + '.xml')}: copy the release's testing "
                "lesion_annotations there or remove the slide"
            )
        slides.append(C16Slide(p.stem, p, label, "testing", xml))
    return slides


def read_asap_annotation(path: str | Path) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The tumour and the excluded polygons of an ASAP XML annotation, each an ``(n, 2)`` float64 array of level-0
    ``(x, y)``: ``<Annotation Type="Polygon" PartOfGroup="_0|_1|_2"><Coordinates><Coordinate Order X Y/>``. Groups
    ``_0`` and ``_1`` (or ``Tumor``, ``metastases``) are tumour, ``_2`` (or ``Exclusion``) is subtracted. Dots and
    point sets are ignored.

    Raises:
        DataError: naming the file, when it is not XML, holds no tumour polygon, a polygon of fewer than 3 points or
            non-numeric coordinates, or a group that is neither tumour nor excluded.
    """
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as e:
        raise DataError([f"annotation {path} is not a readable ASAP XML file ({e}): download it again"]) from e
    tumour, excluded, problems = [], [], []
    for i, ann in enumerate(root.iter("Annotation")):
        kind = (ann.get("Type") or "").lower()
        if kind not in _POLYGON_TYPES:
            continue
        group, name = (ann.get("PartOfGroup") or "").strip(), ann.get("Name") or f"#{i}"
        coords = sorted(ann.iter("Coordinate"), key=lambda c: float(c.get("Order") or 0))
        try:
            points = np.array([[float(c.get("X")), float(c.get("Y"))] for c in coords], np.float64)
        except (TypeError, ValueError):
            problems.append(f"annotation {path}: polygon {name} has a coordinate that is not a number")
            continue
        if len(points) < 3 or not np.isfinite(points).all():
            problems.append(f"annotation {path}: polygon {name} has {len(points)} point(s); a polygon needs 3 or more")
            continue
        if group.lower() in TUMOUR_GROUPS:
            tumour.append(points)
        elif group.lower() in EXCLUDED_GROUPS:
            excluded.append(points)
        else:
            problems.append(
                f"annotation {path}: polygon {name} is in group {group!r}, neither tumour ({', '.join(TUMOUR_GROUPS)}) "
                f"nor excluded ({', '.join(EXCLUDED_GROUPS)}): fix its PartOfGroup"
            )
    if not problems and not tumour:
        problems.append(
            f'annotation {path} holds no tumour polygon (<Annotation Type="Polygon" PartOfGroup="_0"> with '
            "<Coordinate X= Y=> points): it is empty or not a lesion annotation; export it again from ASAP"
        )
    if problems:
        raise DataError(problems, f"the annotation {path}")
    return tumour, excluded


def check_annotation_on_slide(
    tumour: Sequence[np.ndarray], excluded: Sequence[np.ndarray], size: tuple[int, int], xml: Path, slide: Path
) -> list[str]:
    """Problems of polygons that lie wholly outside the slide (``size`` = level-0 ``(height, width)``); a polygon
    partly outside is clipped to the slide, with a warning."""
    h, w = size
    problems = []
    for what, polygons in (("tumour", tumour), ("excluded", excluded)):
        for i, poly in enumerate(polygons):
            (x0, y0), (x1, y1) = poly.min(0), poly.max(0)
            if x1 <= 0 or y1 <= 0 or x0 >= w or y0 >= h:
                problems.append(
                    f"annotation {xml}: {what} polygon {i} spans x {x0:.0f}..{x1:.0f}, y {y0:.0f}..{y1:.0f}, wholly "
                    f"outside slide {slide} ({w} x {h} pixels at level 0): the annotation belongs to another slide "
                    "or is not in level-0 pixels"
                )
            elif x0 < 0 or y0 < 0 or x1 > w or y1 > h:
                logger.warning(f"annotation {xml}: {what} polygon {i} runs past the edge of {slide}; clipped there")
    return problems


def fill_polygon(points: np.ndarray, x0: float, y0: float, width: int, height: int) -> np.ndarray:
    """Rasterise one polygon (``(n, 2)`` level-0 ``(x, y)``, closed implicitly) on the ``height x width`` window whose
    top-left pixel is ``(x0, y0)``: pixel ``(r, c)`` is set when its centre ``(x0 + c + 0.5, y0 + r + 0.5)`` is
    inside by the even-odd rule. An edge counts for the rows whose centre ``y`` satisfies ``min(ya, yb) <= y <
    max(ya, yb)`` and a centre lying exactly on a crossing counts as right of it, so centres exactly on a left or top
    edge are inside and on a right or bottom edge outside (the top-left rule): a pixel is never in two polygons that
    share an edge. No anti-aliasing: the mask is exact for this rule. A scanline fill in NumPy (cost: rows x edges
    crossing them), so polygons of thousands of points are cheap."""
    pts = np.asarray(points, np.float64)
    xa, ya = pts[:, 0] - x0 - 0.5, pts[:, 1] - y0 - 0.5  # pixel centres at integer (c, r) in these coordinates
    xb, yb = np.roll(xa, -1), np.roll(ya, -1)
    lo, hi = np.minimum(ya, yb), np.maximum(ya, yb)
    first = np.clip(np.ceil(lo), 0, height).astype(np.int64)  # rows r with lo <= r < hi
    stop = np.clip(np.ceil(hi), 0, height).astype(np.int64)
    keep = stop > first
    xa, ya, xb, yb, first, stop = (a[keep] for a in (xa, ya, xb, yb, first, stop))
    counts = stop - first
    mask = np.zeros((height, width), bool)
    if counts.sum() == 0:
        return mask
    edge = np.repeat(np.arange(len(counts)), counts)
    rows = first[edge] + (np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts))
    x = xa[edge] + (rows - ya[edge]) * (xb[edge] - xa[edge]) / (yb[edge] - ya[edge])
    cols = np.clip(np.ceil(x), 0, width).astype(np.int64)  # the crossing toggles the pixels with centre c >= x
    toggles = np.bincount(rows * (width + 1) + cols, minlength=height * (width + 1)).reshape(height, width + 1)
    return (np.cumsum(toggles[:, :width], axis=1) % 2).astype(bool)


def polygon_boxes(polygons: Sequence[np.ndarray]) -> np.ndarray:
    """The ``(n, 4)`` bounding boxes ``(x_min, y_min, x_max, y_max)`` of polygons (``(k, 2)`` ``(x, y)`` each)."""
    return np.array([[*p.min(0), *p.max(0)] for p in polygons]).reshape(-1, 4)


def rasterize_annotation(
    tumour: Sequence[np.ndarray],
    excluded: Sequence[np.ndarray],
    x0: int,
    y0: int,
    width: int,
    height: int | None = None,
) -> np.ndarray:
    """The lesion mask (bool ``(height, width)``) of the level-0 window at ``(x0, y0)``: the union of the tumour
    polygons minus the union of the excluded ones, each filled by :func:`fill_polygon` (pixel centres, even-odd,
    top-left rule; exact, no anti-aliasing)."""
    height = width if height is None else height
    mask = np.zeros((height, width), bool)
    for polygons, value in ((tumour, True), (excluded, False)):
        if not len(polygons):
            continue
        boxes = polygon_boxes(polygons)
        near = (boxes[:, 2] >= x0) & (boxes[:, 0] <= x0 + width) & (boxes[:, 3] >= y0) & (boxes[:, 1] <= y0 + height)
        for i in np.flatnonzero(near):
            filled = fill_polygon(polygons[i], x0, y0, width, height)
            mask[filled] = value
    return mask


def choose_tissue_level(reader: Any, wsi: Any, patch_size: int, path: Path, min_pixels_per_patch: int = 8) -> int:
    """The coarsest level with at least ``min_pixels_per_patch`` pixels a patch side (level 6, downsample 64, for
    512 px patches on a CAMELYON16 slide), where the tissue is found."""
    n = reader.get_level_count(wsi)
    limit = patch_size / min_pixels_per_patch * 1.01  # a level's downsample is rarely a whole number (64.0007)
    fine = [i for i in range(n) if float(reader.get_downsample_ratio(wsi, i)) <= limit]
    level = max(fine) if fine else 0
    h, w = reader.get_size(wsi, level)
    if h * w > 2**28:
        raise DataError(
            [
                f"slide {path} has no low-resolution level (level {level} is {w} x {h} pixels): it is not pyramidal; "
                "save it as a pyramidal tiled TIFF (e.g. vips tiffsave --tile --pyramid)"
            ]
        )
    return level


def patch_area_fractions(mask: np.ndarray, downsample: tuple[float, float], xs: np.ndarray, ys: np.ndarray, size: int):
    """The fraction of each level-0 patch ``[x, x + size) x [y, y + size)`` (``xs`` columns by ``ys`` rows of a grid)
    covered by a low-resolution bool ``mask`` whose pixel ``(r, c)`` covers level-0 ``[c dx, (c + 1) dx) x [r dy,
    (r + 1) dy)`` (``downsample = (dy, dx)``): exact areas, ``(len(ys), len(xs))``."""

    def overlaps(starts: np.ndarray, n: int, d: float) -> np.ndarray:
        edges = np.arange(n + 1) * d
        lo = np.maximum(starts[:, None], edges[None, :-1])
        hi = np.minimum(starts[:, None] + size, edges[None, 1:])
        return np.clip(hi - lo, 0, None)

    wy = overlaps(np.asarray(ys, np.float64), mask.shape[0], downsample[0])
    wx = overlaps(np.asarray(xs, np.float64), mask.shape[1], downsample[1])
    return (wy @ mask.astype(np.float64) @ wx.T) / float(size * size)


def rng_for(seed: int, *names: str) -> np.random.Generator:
    """A generator for one slide and purpose, independent of the order slides are processed in."""
    return np.random.default_rng([int(seed), *(zlib.crc32(n.encode()) for n in names)])


def select_metastatic(
    scan: dict,
    name: str,
    seed: int,
    min_tissue: float = 0.1,
    min_metastatic: float = 0.2,
    high: float = 0.5,
    high_ratio: float = 1.0,
) -> np.ndarray:
    """Indices into ``scan`` of the metastatic patches kept: tissue >= ``min_tissue`` and ``p >= min_metastatic``; all
    of ``p <= high``, and a seeded random subset of the ``p > high`` ones, at most ``high_ratio`` times as many as the
    former (at least one when there are any). Sorted."""
    tissue, p = np.asarray(scan["tissue"]), np.asarray(scan["metastatic"])
    ok = (tissue >= min_tissue) & (p >= min_metastatic)
    low = np.flatnonzero(ok & (p <= high))
    above = np.flatnonzero(ok & (p > high))
    n_high = min(above.size, max(int(round(high_ratio * low.size)), 1))
    chosen = rng_for(seed, name, "metastatic").choice(above, size=n_high, replace=False) if above.size else above
    return np.sort(np.concatenate([low, chosen]).astype(np.int64))


def normal_quotas(available: dict[str, int], total: int) -> dict[str, int]:
    """Share ``total`` normal patches evenly among slides (``{name: tissue patches it has}``, in order), each giving at
    most what it has; what a slide cannot give goes to the others."""
    quotas = {name: 0 for name in available}
    left = min(total, sum(available.values()))
    open_ = [n for n in available if available[n] > 0]
    while left > 0 and open_:
        share, extra = divmod(left, len(open_))
        for i, name in enumerate(open_):
            give = min(share + (i < extra), available[name] - quotas[name])
            quotas[name] += give
            left -= give
        open_ = [n for n in open_ if quotas[n] < available[n]]
    return quotas


def select_normal(scan: dict, name: str, seed: int, count: int, min_tissue: float = 0.1) -> np.ndarray:
    """Indices into ``scan`` of ``count`` normal patches drawn at random (seeded) among those of at least
    ``min_tissue`` tissue. Sorted."""
    candidates = np.flatnonzero(np.asarray(scan["tissue"]) >= min_tissue)
    count = min(count, candidates.size)
    if count == 0:
        return np.zeros(0, np.int64)
    return np.sort(rng_for(seed, name, "normal").choice(candidates, size=count, replace=False)).astype(np.int64)


#: the pipeline's names, moved to :mod:`monai_wsl.apps.camelyon16`; still importable from here
_MOVED = ("SPLITS", "scan_slide", "prepare_camelyon16")


def __getattr__(name: str) -> Any:
    if name in _MOVED:  # imported when asked for: the pipeline (apps/) stands above the data it reads
        from monai_wsl.apps import camelyon16

        return getattr(camelyon16, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
