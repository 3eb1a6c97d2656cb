"""Check a run before it starts: every listed image and mask opened once, every problem of the whole dataset reported
together, each with its file and the fix. Nothing is trained on data that would fail later."""

from __future__ import annotations

import functools
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

__all__ = ["DataError", "check_run", "inspect_image", "writable_problem", "warn_if_synthetic", "READABLE_SUFFIXES"]

logger = logging.getLogger(__name__)

#: what the bundle's LoadImaged reads (PIL for PNG / JPEG / BMP, ITK for TIFF, nibabel for NIfTI)
READABLE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".nii", ".nii.gz")
_PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


class DataError(ValueError):
    """The problems found before a run, one per line: the file, what is wrong, the fix."""

    def __init__(self, problems: Sequence[str], what: str = "the data") -> None:
        self.problems, self.what = list(problems), what
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s) in {what}; nothing was run:\n{lines}")

    def __reduce__(self) -> tuple:
        # rebuilt from its problems (not from its message) when it comes back from a worker process
        return type(self), (self.problems, self.what)


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def _read_pixels(path: Path) -> np.ndarray:
    """The pixels as the bundle's reader sees their values (all of them: a truncated file fails here)."""
    suffix = _suffix(path)
    if suffix in (".nii", ".nii.gz"):
        import nibabel as nib

        return np.asarray(nib.load(str(path)).dataobj)
    if suffix in (".tif", ".tiff"):
        import tifffile

        with tifffile.TiffFile(path) as tif:
            page, series = tif.pages[0], tif.series[0]  # a stack of pages is one series of more dimensions
            if series.dtype.kind == "f":
                raise _Refused("is a floating-point TIFF: save it as 8-bit RGB (or 16-bit grey)")
            if page.samplesperpixel >= 3 and page.bitspersample > 8:
                raise _Refused(
                    f"is a {page.bitspersample}-bit RGB TIFF, which ITK (MONAI's TIFF reader) does not load: "
                    "save it as 8-bit RGB"
                )
            return series.asarray()
    from PIL import Image

    with Image.open(path) as im:
        if im.mode == "P":
            raise _Refused("is a palette image (PIL mode P), read as palette indices: convert it to RGB first")
        im.load()
        return np.asarray(im)


class _Refused(Exception):
    """A readable file in a form the bundle does not take (the message says which and the fix)."""


def inspect_image(
    path: str | Path, role: str = "image", min_size: int = 1, spatial_dims: int = 2
) -> tuple[str | None, tuple[int, ...] | None]:
    """What is wrong with the image (or mask) file ``path`` for the bundle (missing, a folder, empty, an unsupported or
    damaged file, a form the readers cannot load, non-finite pixels, smaller than ``min_size``), or None; and its
    spatial size (height, width[, depth]) when it could be read. The file is read once, whole: a truncated file is
    found here. ``spatial_dims``: 2 for images, 3 for volumes (one channel or up to 4 in a last axis)."""
    path = Path(path)
    if not path.exists():
        return f"{role} {path} does not exist: fix the path in the datalist", None
    if path.is_dir():
        return f"{role} {path} is a folder, not an image file: point the datalist at the file", None
    if path.stat().st_size == 0:
        return f"{role} {path} is empty (0 bytes): copy or export it again", None
    if _suffix(path) not in READABLE_SUFFIXES:
        return f"{role} {path} is not a file type the bundle reads ({', '.join(READABLE_SUFFIXES)}): convert it", None
    try:
        pixels = _read_pixels(path)
    except _Refused as e:
        return f"{role} {path} {e}", None
    except Exception as e:  # damaged, truncated, not an image: the reader's own words
        return f"{role} {path} cannot be read ({type(e).__name__}: {e}): export or download it again", None
    channels = pixels.ndim == spatial_dims + 1
    if pixels.ndim not in (spatial_dims, spatial_dims + 1) or (channels and pixels.shape[-1] > 4):
        what = "a 2D image (height, width)" if spatial_dims == 2 else "a volume (x, y, z)"
        return (
            f"{role} {path} has shape {tuple(pixels.shape)}: expected {what} with 1 to 4 channels "
            "(grey, grey + alpha, RGB, RGBA): convert it"
        ), None
    size = tuple(int(s) for s in pixels.shape[:spatial_dims])
    if pixels.dtype.kind == "f" and not np.isfinite(pixels).all():
        count = int((~np.isfinite(pixels)).sum())
        return f"{role} {path} has {count} non-finite pixel value(s) (NaN or Inf): fix or drop the image", size
    if min(size) < min_size:
        return (
            f"{role} {path} is {' x '.join(map(str, size[::-1] if spatial_dims == 2 else size))} pixels; the network "
            f"needs at least {min_size} on each side: drop it or resize it"
        ), size
    return None, size


def _item_problems(
    item: object, where: str, needs_mask: bool | str, num_classes: int, min_size: int, spatial_dims: int = 2
) -> list[str]:
    if not isinstance(item, Mapping):
        return [f"{where} must be an object {{'image', 'label', 'mask'}}, got {item!r}: fix the datalist"]
    problems = []
    for key in ("image", "label") + (("mask",) if needs_mask and needs_mask != "empty" else ()):
        if key not in item:
            fix = (
                "add the ground-truth mask (scored there), or, when an image without a mask has no foreground, put "
                '"missing_mask": "empty" at the top level of the datalist'
                if key == "mask"
                else f"add its {key}"
            )
            problems.append(f"{where} ({item.get('image', '?')}) has no {key!r}: {fix}")
    label = item.get("label")
    if "label" in item and not (isinstance(label, (int, np.integer)) and not isinstance(label, bool)):
        problems.append(f"{where} ({item.get('image', '?')}) has label {label!r}: it must be a class index (an int)")
    elif "label" in item and not 0 <= label < num_classes:
        problems.append(
            f"{where} ({item.get('image', '?')}) has label {label}, not a class index in [0, {num_classes})"
        )
    sizes = {}
    for key in ("image", "mask"):
        if key in item and not isinstance(item[key], str):
            problems.append(f"{where} has {key} {item[key]!r}: it must be a file path (a string)")
        elif key in item:
            problem, sizes[key] = inspect_image(item[key], key, min_size if key == "image" else 1, spatial_dims)
            problems += [f"{where}: {problem}"] if problem else []
    if not problems and "mask" in sizes and sizes["mask"] != sizes["image"]:
        problems.append(
            f"{where}: mask {item['mask']} is {sizes['mask']} but image {item['image']} is {sizes['image']} (in "
            "pixels): they must match pixel for pixel; fix or re-export the mask"
        )
    return problems


def _image_problems(image: str | Path, min_size: int, spatial_dims: int) -> list[str]:
    problem, _ = inspect_image(image, "image", min_size, spatial_dims)
    return [problem] if problem else []


#: more items than this to check: a progress bar
PROGRESS_ABOVE = 500


def _run_checks(checks: Sequence, num_threads: int | None) -> list[list[str]]:
    """Each check's problems, in the checks' order, from a pool of threads (a bar above PROGRESS_ABOVE checks)."""
    if num_threads is None:
        num_threads = min(8, os.cpu_count() or 1)
    from PIL import Image
    from tqdm.auto import tqdm

    Image.init()  # Pillow registers its plugins on first use: once here, not in several threads at a time
    with (
        ThreadPoolExecutor(max_workers=max(1, num_threads), thread_name_prefix="monai_wsl_check") as pool,
        tqdm(total=len(checks), desc="checking the data", unit="item", leave=False,
             disable=len(checks) <= PROGRESS_ABOVE) as bar,
    ):  # fmt: skip
        results = []
        try:
            for found in pool.map(lambda check: check(), checks) if num_threads > 1 else (c() for c in checks):
                results.append(found)
                bar.update()
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise
    return results


def writable_problem(folder: str | Path) -> str | None:
    """What keeps the run from writing into ``folder`` (created when missing), or None."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
    except OSError as e:
        return f"output folder {folder} is not writable ({e.strerror}): choose another (e.g. --bundle_root DIR)"
    return None


def warn_if_synthetic(checkpoint: str | Path, datalist: str | Path | None, images: Sequence[str | Path]) -> None:
    """Warn when the model card of ``checkpoint`` says it was trained on the embedded synthetic set and the run's data
    (``datalist`` or ``images``) is another."""
    from monai_wsl.model_card import read_model_card

    card = read_model_card(checkpoint) or {}
    trained_on = card.get("trained_on", {})
    if not trained_on.get("synthetic"):
        return
    synthetic = Path(trained_on.get("datalist", "")).parent.resolve()
    used = [Path(datalist).parent] if datalist else [Path(i).parent for i in images]
    if any(not p.resolve().is_relative_to(synthetic) for p in used):  # the synthetic slide lives in its folder
        logger.warning(
            f"{checkpoint} was trained on the embedded synthetic set ({synthetic}), not on histology images: its masks "
            "and classes on these images mean nothing. Train on your data first (bundle/docs/README.md, Train)."
        )


def _datalist_checks(
    datalist: str | Path | None,
    splits: Mapping[str, bool],
    num_classes: int,
    min_size: int,
    spatial_dims: int,
    problems: list[str],
) -> list:
    """One check per item of the splits read (a split that cannot be read is added to ``problems``)."""
    from monai_wsl.data.datalist import load_datalist, missing_mask_is_empty

    empty_masks = datalist is not None and missing_mask_is_empty(datalist)
    checks = []
    for split, needs_mask in splits.items():
        try:
            items = load_datalist(datalist, split, check_files=False)
        except ValueError as e:
            problems.append(str(e))
            continue
        needs = "empty" if needs_mask and empty_masks else needs_mask
        checks += [
            functools.partial(_item_problems, item, f"{split}[{i}]", needs, num_classes, min_size, spatial_dims)
            for i, item in enumerate(items)
        ]
    return checks


def check_run(
    datalist: str | Path | None = None,
    splits: Mapping[str, bool] | None = None,
    class_names: Sequence[str] = ("benign", "malignant"),
    min_size: int = 1,
    images: Sequence[str | Path] = (),
    writable: Sequence[str | Path] = (),
    resize_short_side: int | None = None,
    crop_size: int | None = None,
    checkpoint: str | Path | None = None,
    spatial_dims: int = 2,
    num_threads: int | None = None,
) -> None:
    """Check everything a run will read or write before it starts, and raise one :class:`DataError` listing every
    problem found.

    Args:
        datalist: a MONAI datalist JSON (relative paths are read from its folder, as ``load_datalist`` does).
        splits: the splits the run reads, each with whether its items need a ``mask`` (``{"training": False,
            "validation": True}``). A datalist whose top level says ``"missing_mask": "empty"`` (CAMELYON16 patches)
            lets scored items go without one: their mask is all zero (``monai_wsl.transforms.EmptyMaskd``).
        class_names: the classes; a label must be an index into them.
        min_size: the smallest side the network takes (images scored at full size).
        images: images of an inference run (no datalist).
        writable: folders the run writes to (created when missing).
        resize_short_side, crop_size: the training crop must fit in the resized image.
        checkpoint: the model an evaluation or inference uses: a warning when its model card says it was trained on
            the embedded synthetic set and the run's data is another.
        spatial_dims: 2 for images, 3 for volumes.
        num_threads: threads that read the files (default: one per CPU core, at most 8); every image is decoded
            whole, so a dataset of tens of thousands of patches takes minutes on one thread. A progress bar shows
            when there are more than :data:`PROGRESS_ABOVE` items (datalist items and images).
    """
    problems = []
    if resize_short_side is not None and crop_size is not None and crop_size > resize_short_side:
        problems.append(
            f"crop_size {crop_size} is larger than resize_short_side {resize_short_side}: crops would not be square; "
            f"set --resize_short_side {crop_size} or more"
        )
    # one call per datalist item or image, run by threads (the image decoders release the GIL)
    checks = _datalist_checks(datalist, splits or {}, len(class_names), min_size, spatial_dims, problems)
    checks += [functools.partial(_image_problems, image, min_size, spatial_dims) for image in images]
    for found in _run_checks(checks, num_threads):
        problems += found
    problems += [p for p in map(writable_problem, writable) if p]
    if checkpoint is not None:
        warn_if_synthetic(checkpoint, datalist, images)
    if problems:
        error = DataError(problems, f"the run's data ({datalist})" if datalist else "the run's inputs")
        logger.error(str(error))
        raise error
    logger.info(
        "checked the run's data: %s",
        ", ".join(f"{s} ok" for s in (splits or {})) or f"{len(images)} image(s) ok",
    )
