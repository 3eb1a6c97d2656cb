"""The CAMELYON16-P512 preparation's work on one slide, run in worker processes by
:func:`monai_wsl.apps.camelyon16.prepare_camelyon16`: scan a slide (the tissue and metastatic fractions of its grid
patches, kept in ``<out>/.work/scans``) and write its chosen patches (images, and masks of the metastatic ones). Every
file is written under a temporary name and renamed when complete, so an interrupted run resumes where it stopped."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from monai_wsl.data.camelyon16 import (
    C16Slide,
    check_annotation_on_slide,
    choose_tissue_level,
    patch_area_fractions,
    polygon_boxes,
    rasterize_annotation,
    read_asap_annotation,
)
from monai_wsl.data.check import DataError
from monai_wsl.data.slides import opened_slide, tissue_mask
from monai_wsl.utils import atomic_write, write_bytes_atomic

__all__ = ["scan_slide", "scan_slides", "scan_file", "load_scan", "patch_name", "write_slide_patches"]


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
    with opened_slide(slide.path) as (reader, wsi):
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
        level, tissue, threshold = _tissue(reader, wsi, slide, patch_size, min_saturation)
    hl, wl = tissue.shape
    xs = np.arange(w0 // patch_size) * patch_size
    ys = np.arange(h0 // patch_size) * patch_size
    fractions = patch_area_fractions(tissue, (h0 / hl, w0 / wl), xs, ys, patch_size)
    metastatic = np.zeros_like(fractions)
    if tumour:
        todo = _meeting(polygon_boxes(tumour), xs, ys, patch_size) & (fractions >= min_tissue)
        for r, c in _progress(np.argwhere(todo), progress, f"{slide.name} (lesion)"):
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


def _tissue(reader: Any, wsi: Any, slide: C16Slide, patch_size: int, min_saturation: float) -> tuple:
    """``(level, tissue mask, Otsu threshold)`` of the slide's tissue level (:func:`choose_tissue_level`)."""
    level = choose_tissue_level(reader, wsi, patch_size, slide.path)
    hl, wl = (int(v) for v in reader.get_size(wsi, level))
    try:
        rgb, _ = reader.get_data(wsi, location=(0, 0), size=(hl, wl), level=level)
    except Exception as e:
        raise DataError([f"slide {slide.path}: level {level} cannot be read ({type(e).__name__}: {e})"]) from e
    rgb = np.moveaxis(np.asarray(rgb), 0, -1)[..., :3]
    tissue, threshold = tissue_mask(rgb, min_saturation)
    return level, tissue, threshold


def _meeting(boxes: np.ndarray, xs: np.ndarray, ys: np.ndarray, patch_size: int) -> np.ndarray:
    """Which grid patches (``(len(ys), len(xs))``) meet one of the bounding ``boxes``."""
    gx, gy = np.meshgrid(xs, ys)
    meets = np.zeros((len(ys), len(xs)), bool)
    for x_lo, y_lo, x_hi, y_hi in boxes:
        meets |= (gx + patch_size > x_lo) & (gx < x_hi) & (gy + patch_size > y_lo) & (gy < y_hi)
    return meets


def _progress(items: Any, show: bool, desc: str) -> Any:
    if not show:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="patch", leave=False)


def _save_png_atomic(path: Path, array: np.ndarray) -> None:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    write_bytes_atomic(path, buffer.getvalue())


def patch_name(slide: str, x: int, y: int) -> str:
    """A patch's file stem: ``<slide>_x<X>_y<Y>`` (level-0 pixels)."""
    return f"{slide}_x{x}_y{y}"


def scan_file(work: Path, name: str) -> Path:
    """Where the scan of slide ``name`` is kept."""
    return work / "scans" / f"{name}.npz"


def _scan_task(args: tuple) -> tuple[str, float]:
    """Scan one slide into ``work/scans/<name>.npz`` (written under a temporary name, then renamed)."""
    slide, work, patch_size, min_tissue, min_saturation, progress = args
    start = time.perf_counter()
    scan = scan_slide(slide, patch_size, min_tissue, min_saturation, progress)
    with atomic_write(scan_file(work, slide.name), suffix=".npz") as (tmp,):
        np.savez(tmp, **{k: np.asarray(v) for k, v in scan.items()})
    return slide.name, time.perf_counter() - start


def load_scan(work: Path, name: str) -> dict:
    """The scan of slide ``name`` (:func:`scan_slide`), as written by :func:`scan_slides`."""
    with np.load(scan_file(work, name)) as data:
        return {k: data[k] if data[k].ndim else data[k].item() for k in data.files}


def _extract_task(args: tuple) -> tuple[str, float, int]:
    """Write the chosen patches of one slide (image, and mask for metastatic patches), each under a temporary name
    renamed when complete; patches already there are not read again. A marker in ``work/done`` says the slide is
    finished."""
    slide, work, out, patches, patch_size, progress, position = args
    start = time.perf_counter()
    done = work / "done" / f"{slide.name}.json"
    names = [patch_name(slide.name, p["x"], p["y"]) for p in patches]
    if done.is_file() and json.loads(done.read_text()).get("patches") == names:
        return slide.name, 0.0, 0
    todo = [
        p
        for p, n in zip(patches, names)
        if not (out / "images" / slide.name / f"{n}.png").is_file()
        or (p["label"] == 1 and not (out / "masks" / slide.name / f"{n}_mask.png").is_file())
    ]
    bar = None
    if todo and progress:
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
        written = _write_patches(slide, out, todo, patch_size, bar) if todo else 0
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - start
    write_bytes_atomic(done, json.dumps({"patches": names, "seconds": round(seconds, 3)}).encode())
    return slide.name, seconds, written


def _write_patches(slide: C16Slide, out: Path, todo: list[dict], patch_size: int, bar: Any) -> int:
    """Read the patches ``todo`` of a slide and write their images (and masks); returns how many were written."""
    tumour: list[np.ndarray] = []
    excluded: list[np.ndarray] = []
    written = 0
    with opened_slide(slide.path) as (reader, wsi):
        if slide.annotation is not None:
            tumour, excluded = read_asap_annotation(slide.annotation)
        for p in todo:
            name = patch_name(slide.name, p["x"], p["y"])
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
    return written


def _run(task: Any, jobs: list, workers: int) -> list:
    if workers <= 1 or len(jobs) <= 1:
        return [task(j) for j in jobs]
    from concurrent.futures import ProcessPoolExecutor

    pool = ProcessPoolExecutor(max_workers=min(workers, len(jobs)))
    try:
        return list(pool.map(task, jobs))
    finally:  # on a failure, the slides not started yet are not run (what is done stays done: a rerun resumes)
        pool.shutdown(wait=True, cancel_futures=True)


def scan_slides(
    slides: Sequence[C16Slide],
    work: Path,
    patch_size: int,
    min_tissue: float,
    min_saturation: float,
    workers: int = 1,
    progress: bool = True,
) -> dict[str, float]:
    """Scan ``slides`` into ``work/scans/<name>.npz`` (:func:`scan_file`), in ``workers`` processes; returns the
    seconds each took."""
    jobs = [(s, work, patch_size, min_tissue, min_saturation, progress and workers <= 1) for s in slides]
    return dict(_run(_scan_task, jobs, workers))


def write_slide_patches(
    slides: Sequence[C16Slide],
    chosen: dict[str, list[dict]],
    work: Path,
    out: Path,
    patch_size: int,
    workers: int = 1,
    progress: bool = True,
) -> dict[str, tuple[float, int]]:
    """Write the ``chosen`` patches of each slide into ``out`` (``{slide name: [{"x", "y", "label"}, ...]}``), in
    ``workers`` processes; a slide marked finished in ``work/done`` is skipped. Returns ``{name: (seconds, patches
    written)}``."""
    jobs = [
        (s, work, out, chosen[s.name], patch_size, progress, i % workers if workers > 1 else None)
        for i, s in enumerate(s for s in slides if chosen[s.name])
    ]
    return {name: (seconds, written) for name, seconds, written in _run(_extract_task, jobs, workers)}
