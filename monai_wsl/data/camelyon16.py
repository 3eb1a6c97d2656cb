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
``scripts/prepare_camelyon16.py`` runs the whole pipeline (resumable, in parallel); this module holds its parts.
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
from .slides import open_slide, tissue_mask

__all__ = [
    "CAMELYON16_CLASS_NAMES",
    "EXCLUDED_SLIDES",
    "C16Slide",
    "find_camelyon16_slides",
    "read_asap_annotation",
    "check_annotation_on_slide",
    "fill_polygon",
    "rasterize_annotation",
    "choose_tissue_level",
    "patch_area_fractions",
    "scan_slide",
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
        notes = _annotations_in(src / "training" / "lesion_annotations")
        for p in _slides_in(folders["tumor"]):
            xml = notes.get(p.stem.lower())
            if xml is None:
                problems.append(
                    f"tumour slide {p} has no annotation {src / 'training' / 'lesion_annotations' / (p.stem + '.xml')}"
                    ": copy the release's lesion_annotations folder there (unzip lesion_annotations.zip) or remove "
                    "the slide"
                )
            slides.append(C16Slide(p.stem, p, 1, "training", xml))
    if folders["test"].is_dir():
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
        for p in _slides_in(folders["test"]):
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


def _bbox(polygons: Sequence[np.ndarray]) -> np.ndarray:
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
        boxes = _bbox(polygons)
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


def scan_slide(
    slide: C16Slide,
    patch_size: int = 512,
    min_tissue: float = 0.1,
    min_saturation: float = 0.07,
    progress: bool = False,
) -> dict[str, np.ndarray | int | float]:
    """Every grid patch of a slide that has tissue or lesion: its level-0 corner ``x``, ``y``, its ``tissue`` fraction
    and (tumour slides; 0 elsewhere) its ``metastatic`` fraction, computed for the patches of at least ``min_tissue``
    tissue that meet the annotation's bounding boxes. Also the slide's level-0 ``width``, ``height``, the
    ``tissue_level`` and the Otsu ``threshold``.

    Raises:
        DataError: naming the file, for a slide that cannot be read or is not pyramidal, and for an annotation
            that is unreadable, empty or outside the slide.
    """
    reader, wsi = open_slide(slide.path)
    try:
        h0, w0 = (int(v) for v in reader.get_size(wsi, 0))
        if min(h0, w0) < patch_size:
            raise DataError(
                [f"slide {slide.path} is {w0} x {h0} pixels at level 0, smaller than a patch ({patch_size})"]
            )
        tumour: list[np.ndarray] = []
        excluded: list[np.ndarray] = []
        if slide.annotation is not None:
            tumour, excluded = read_asap_annotation(slide.annotation)
            problems = check_annotation_on_slide(tumour, excluded, (h0, w0), slide.annotation, slide.path)
            if problems:
                raise DataError(problems, f"the annotation {slide.annotation}")
        level = choose_tissue_level(reader, wsi, patch_size, slide.path)
        hl, wl = (int(v) for v in reader.get_size(wsi, level))
        try:
            rgb, _ = reader.get_data(wsi, location=(0, 0), size=(hl, wl), level=level)
        except Exception as e:
            raise DataError([f"slide {slide.path}: level {level} cannot be read ({type(e).__name__}: {e})"]) from e
        rgb = np.moveaxis(np.asarray(rgb), 0, -1)[..., :3]
        tissue, threshold = tissue_mask(rgb, min_saturation)
        xs = np.arange(w0 // patch_size) * patch_size
        ys = np.arange(h0 // patch_size) * patch_size
        fractions = patch_area_fractions(tissue, (h0 / hl, w0 / wl), xs, ys, patch_size)
        metastatic = np.zeros_like(fractions)
        if tumour:
            boxes = _bbox(tumour)
            gx, gy = np.meshgrid(xs, ys)
            meets = np.zeros(fractions.shape, bool)
            for x_lo, y_lo, x_hi, y_hi in boxes:
                meets |= (gx + patch_size > x_lo) & (gx < x_hi) & (gy + patch_size > y_lo) & (gy < y_hi)
            todo = np.argwhere(meets & (fractions >= min_tissue))
            for r, c in _progress(todo, progress, f"{slide.name} (lesion)"):
                metastatic[r, c] = rasterize_annotation(tumour, excluded, int(xs[c]), int(ys[r]), patch_size).mean()
        rows, cols = np.nonzero((fractions > 0) | (metastatic > 0))
        return {
            "x": xs[cols].astype(np.int64),
            "y": ys[rows].astype(np.int64),
            "tissue": fractions[rows, cols].astype(np.float64),
            "metastatic": metastatic[rows, cols].astype(np.float64),
            "grid": int(xs.size * ys.size),
            "width": w0,
            "height": h0,
            "tissue_level": int(level),
            "threshold": float(threshold),
        }
    finally:
        close = getattr(wsi, "close", None)
        if close is not None:
            close()


def _progress(items: Any, show: bool, desc: str) -> Any:
    if not show:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="patch", leave=False)


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


# ---------------------------------------------------------------------------------------------- the whole pipeline
SPLITS = ("training", "validation", "test")
_CSV_FIELDS = ("image", "mask", "label", "slide", "x", "y", "tissue", "metastatic")


def _write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary name beside ``path``, then rename it into place; unchanged files are left as
    they are (a rerun rewrites nothing)."""
    if path.is_file() and path.read_bytes() == data:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_bytes(data)
    tmp.replace(path)


def _save_png_atomic(path: Path, array: np.ndarray) -> None:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    _write_bytes_atomic(path, buffer.getvalue())


def _patch_name(slide: str, x: int, y: int) -> str:
    return f"{slide}_x{x}_y{y}"


def _scan_file(work: Path, name: str) -> Path:
    return work / "scans" / f"{name}.npz"


def _scan_task(args: tuple) -> tuple[str, float]:
    """Scan one slide into ``work/scans/<name>.npz`` (written under a temporary name, then renamed)."""
    import time

    slide, work, patch_size, min_tissue, min_saturation, progress = args
    start = time.perf_counter()
    scan = scan_slide(slide, patch_size, min_tissue, min_saturation, progress)
    path = _scan_file(work, slide.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial.npz")
    np.savez(tmp, **{k: np.asarray(v) for k, v in scan.items()})
    tmp.replace(path)
    return slide.name, time.perf_counter() - start


def _load_scan(work: Path, name: str) -> dict:
    with np.load(_scan_file(work, name)) as data:
        return {k: data[k] if data[k].ndim else data[k].item() for k in data.files}


def _extract_task(args: tuple) -> tuple[str, float, int]:
    """Write the chosen patches of one slide (image, and mask for metastatic patches), each under a temporary name
    renamed when complete; patches already there are not read again. A marker in ``work/done`` says the slide is
    finished."""
    import json
    import time

    slide, work, out, patches, patch_size, progress, position = args
    start = time.perf_counter()
    done = work / "done" / f"{slide.name}.json"
    names = [_patch_name(slide.name, p["x"], p["y"]) for p in patches]
    if done.is_file() and json.loads(done.read_text()).get("patches") == names:
        return slide.name, 0.0, 0
    todo = [
        p
        for p, n in zip(patches, names)
        if not (out / "images" / slide.name / f"{n}.png").is_file()
        or (p["label"] == 1 and not (out / "masks" / slide.name / f"{n}_mask.png").is_file())
    ]
    written = 0
    if todo:
        reader, wsi = open_slide(slide.path)
        tumour: list[np.ndarray] = []
        excluded: list[np.ndarray] = []
        if slide.annotation is not None:
            tumour, excluded = read_asap_annotation(slide.annotation)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(
                total=len(patches),
                initial=len(patches) - len(todo),
                desc=slide.name,
                unit="patch",
                position=position,  # one line per worker process; None: one bar per slide, left on screen
                leave=position is None,
            )
        try:
            for p in todo:
                name = _patch_name(slide.name, p["x"], p["y"])
                try:
                    rgb, _ = reader.get_data(wsi, location=(p["y"], p["x"]), size=(patch_size, patch_size), level=0)
                except Exception as e:
                    raise DataError(
                        [f"slide {slide.path}: the patch at x {p['x']}, y {p['y']} cannot be read ({e})"]
                    ) from e
                rgb = np.ascontiguousarray(np.moveaxis(np.asarray(rgb), 0, -1)[..., :3]).astype(np.uint8)
                if p["label"] == 1:
                    mask = rasterize_annotation(tumour, excluded, p["x"], p["y"], patch_size)
                    _save_png_atomic(out / "masks" / slide.name / f"{name}_mask.png", mask.astype(np.uint8) * 255)
                _save_png_atomic(out / "images" / slide.name / f"{name}.png", rgb)
                written += 1
                if bar is not None:
                    bar.update()
        finally:
            if bar is not None:
                bar.close()
            close = getattr(wsi, "close", None)
            if close is not None:
                close()
    seconds = time.perf_counter() - start
    _write_bytes_atomic(done, json.dumps({"patches": names, "seconds": round(seconds, 3)}).encode())
    return slide.name, seconds, written


def _run(task: Any, jobs: list, workers: int) -> list:
    if workers <= 1 or len(jobs) <= 1:
        return [task(j) for j in jobs]
    from concurrent.futures import ProcessPoolExecutor

    pool = ProcessPoolExecutor(max_workers=min(workers, len(jobs)))
    try:
        return list(pool.map(task, jobs))
    finally:  # on a failure, the slides not started yet are not run (what is done stays done: a rerun resumes)
        pool.shutdown(wait=True, cancel_futures=True)


def _preflight(slides: Sequence[C16Slide], patch_size: int) -> None:
    """Open every slide and read every annotation before any work: all problems in one :class:`DataError`."""
    problems = []
    for s in slides:
        try:
            reader, wsi = open_slide(s.path)
            h, w = (int(v) for v in reader.get_size(wsi, 0))
            close = getattr(wsi, "close", None)
            if close is not None:
                close()
        except DataError as e:
            problems += e.problems
            continue
        if min(h, w) < patch_size:
            problems.append(f"slide {s.path} is {w} x {h} pixels at level 0, smaller than a patch ({patch_size})")
        if s.annotation is not None:
            try:
                tumour, excluded = read_asap_annotation(s.annotation)
            except DataError as e:
                problems += e.problems
                continue
            problems += check_annotation_on_slide(tumour, excluded, (h, w), s.annotation, s.path)
    if problems:
        raise DataError(problems, "the CAMELYON16 slides and annotations")


def prepare_camelyon16(
    src: str | Path,
    out: str | Path,
    patch_size: int = 512,
    seed: int = 0,
    valid_fraction: float = 0.25,
    min_tissue: float = 0.1,
    min_metastatic: float = 0.2,
    high_ratio: float = 1.0,
    min_saturation: float = 0.07,
    exclude: Sequence[str] = EXCLUDED_SLIDES,
    workers: int = 1,
    progress: bool = True,
) -> dict:
    """Cut the CAMELYON16-P512 patches of a release folder ``src`` into ``out`` and write their datalist.

    The training slides are split at slide level into ``training`` and ``validation`` (seeded, stratified by the
    slide's class, ``valid_fraction`` of each class; :func:`monai_wsl.data.stratified_split`), the test slides form
    ``test``. Writes ``out/images/<slide>/<slide>_x<X>_y<Y>.png``, ``out/masks/<slide>/..._mask.png`` (metastatic
    patches only: 255 = lesion; a normal patch has no mask file, which the datalist's ``"missing_mask": "empty"``
    makes an all-zero mask), ``out/splits/<split>.csv`` and, last, ``out/datalist.json``.

    Resumable: the per-slide scans (``out/.work/scans``) and the patches already written are kept, and a rerun
    continues where the last one stopped; the same settings and seed give the same files, byte for byte. A rerun
    with other settings or another set of slides is refused (use another ``out``).

    Returns:
        the datalist written.

    Raises:
        DataError: every problem found, each naming its file (release layout, annotations, slides, settings).
    """
    import json
    import time

    from monai_wsl.utils import write_json_atomic

    from .glas import stratified_split

    out = Path(out).expanduser().resolve()
    work = out / ".work"
    if patch_size < 8:
        raise DataError([f"patch size {patch_size} is too small: use 512 (the protocol) or at least 8"])
    slides = find_camelyon16_slides(src, exclude)
    settings = {
        "src": str(Path(src).expanduser().resolve()),
        "patch_size": int(patch_size),
        "seed": int(seed),
        "valid_fraction": float(valid_fraction),
        "min_tissue": float(min_tissue),
        "min_metastatic": float(min_metastatic),
        "high_ratio": float(high_ratio),
        "min_saturation": float(min_saturation),
        "slides": [s.name for s in slides],
    }
    settings_file = work / "settings.json"
    if settings_file.is_file():
        before = json.loads(settings_file.read_text())
        changed = [k for k in settings if before.get(k) != settings[k]]
        if changed:
            raise DataError(
                [
                    f"{out} was started with other settings ({', '.join(f'{k}: {before.get(k)!r}' for k in changed)}"
                    "): rerun with the same ones to continue it, or pass another --out"
                ]
            )
    todo_scan = [s for s in slides if not _scan_file(work, s.name).is_file()]
    _preflight(todo_scan, patch_size)
    _write_bytes_atomic(settings_file, json.dumps(settings, indent=1).encode())

    # the split, at slide level
    training = {s.name: s.label for s in slides if s.source == "training"}
    split_of = {s.name: "test" for s in slides if s.source == "testing"}
    if training:
        try:
            train, valid = stratified_split(training, valid_fraction, seed)
        except ValueError as e:
            raise DataError([f"the training slides of {src} cannot be split: {e}"]) from e
        split_of.update({n: "training" for n in train} | {n: "validation" for n in valid})

    # 1. scan the slides: tissue and metastatic fractions of every grid patch
    started = time.perf_counter()
    jobs = [(s, work, patch_size, min_tissue, min_saturation, progress and workers <= 1) for s in todo_scan]
    scan_seconds = dict(_run(_scan_task, jobs, workers))
    if todo_scan:
        logger.info("scanned %d slide(s) in %.1f s", len(todo_scan), time.perf_counter() - started)
    scans = {s.name: _load_scan(work, s.name) for s in slides}

    # 2. choose the patches, split by split
    chosen: dict[str, list[dict]] = {s.name: [] for s in slides}
    for split in SPLITS:
        members = [s for s in slides if split_of.get(s.name) == split]
        n_metastatic = 0
        for s in (s for s in members if s.label == 1):
            for i in select_metastatic(scans[s.name], s.name, seed, min_tissue, min_metastatic, 0.5, high_ratio):
                chosen[s.name].append(_item(scans[s.name], i, 1))
                n_metastatic += 1
        normal = [s for s in members if s.label == 0]
        available = {s.name: int((np.asarray(scans[s.name]["tissue"]) >= min_tissue).sum()) for s in normal}
        quotas = normal_quotas(available, n_metastatic)
        for s in normal:
            for i in select_normal(scans[s.name], s.name, seed, quotas[s.name], min_tissue):
                chosen[s.name].append(_item(scans[s.name], i, 0))
        if members and sum(quotas.values()) < n_metastatic:
            logger.warning(
                f"{split}: {n_metastatic} metastatic patches but the normal slides of the split have only "
                f"{sum(quotas.values())} tissue patches: the split is unbalanced"
            )

    # 3. write the patches, slide by slide
    jobs = [
        (s, work, out, chosen[s.name], patch_size, progress, i % workers if workers > 1 else None)
        for i, s in enumerate(s for s in slides if chosen[s.name])
    ]
    extract = {name: (seconds, written) for name, seconds, written in _run(_extract_task, jobs, workers)}

    # 4. the split CSVs and, last, the datalist
    datalist: dict[str, Any] = {split: [] for split in SPLITS}
    for s in slides:
        for p in chosen[s.name]:
            name = _patch_name(s.name, p["x"], p["y"])
            item = {"image": f"images/{s.name}/{name}.png", "label": p["label"]}
            if p["label"] == 1:
                item["mask"] = f"masks/{s.name}/{name}_mask.png"
            item.update(slide=s.name, x=p["x"], y=p["y"], tissue=p["tissue"], metastatic=p["metastatic"])
            datalist[split_of[s.name]].append(item)
    datalist = {k: v for k, v in datalist.items() if v}
    datalist.update(labels=list(CAMELYON16_CLASS_NAMES), missing_mask="empty", patch_size=int(patch_size))
    for split in SPLITS:
        rows = [",".join(_CSV_FIELDS)]
        for item in datalist.get(split, []):
            rows.append(",".join(str(item.get(k, "")) for k in _CSV_FIELDS))
        _write_bytes_atomic(out / "splits" / f"{split}.csv", ("\n".join(rows) + "\n").encode())
    text = json.dumps(datalist, indent=1).encode()
    if not (out / "datalist.json").is_file() or (out / "datalist.json").read_bytes() != text:
        write_json_atomic(out / "datalist.json", datalist)
    datalist["_timing"] = {
        name: {"scan_s": scan_seconds.get(name, 0.0), "extract_s": extract.get(name, (0.0, 0))[0]}
        for name in settings["slides"]
    }
    datalist["_written"] = sum(w for _, w in extract.values())
    return datalist


def _item(scan: dict, i: int, label: int) -> dict:
    return {
        "x": int(scan["x"][i]),
        "y": int(scan["y"][i]),
        "tissue": round(float(scan["tissue"][i]), 6),
        "metastatic": round(float(scan["metastatic"][i]), 6),
        "label": label,
    }
