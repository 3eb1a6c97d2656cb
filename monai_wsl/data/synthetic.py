"""A small synthetic histology-like dataset whose image label is decided by a region the mask should find.

Every image shows pink stroma sprinkled with scattered nuclei (the same in both classes) and up to four glands.
Benign glands (label 0) are a ring of evenly spaced nuclei around a pale lumen; malignant glands (label 1) are
crowded, dark and filled with large irregular nuclei. The ground-truth mask is the union of the glands: only they
tell the classes apart, as in GlaS, where glands and tumour sit in tissue that looks alike in both grades.

It lets a new user see the whole training loop work in minutes on a CPU, and lets tests check that a method finds
the region that decides the label.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from monai_wsl.utils import atomic_write

__all__ = [
    "synthetic_histology_sample",
    "synthetic_volume_sample",
    "make_synthetic_histology",
    "write_synthetic_histology",
    "write_synthetic_volumes",
    "write_synthetic_slide",
    "CLASS_NAMES",
]

CLASS_NAMES = ("benign", "malignant")

_STROMA = np.array([235.0, 175.0, 205.0])
_NUCLEUS = np.array([95.0, 60.0, 140.0])
_LUMEN = np.array([248.0, 238.0, 245.0])


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cell: int) -> np.ndarray:
    """Smooth noise in [0, 1]: a coarse random grid, bilinearly upsampled."""
    h, w = shape
    gh, gw = h // cell + 2, w // cell + 2
    grid = rng.random((gh, gw))
    ys, xs = np.linspace(0, gh - 1.001, h), np.linspace(0, gw - 1.001, w)
    y0, x0 = ys.astype(int), xs.astype(int)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    g00, g01 = grid[y0][:, x0], grid[y0][:, x0 + 1]
    g10, g11 = grid[y0 + 1][:, x0], grid[y0 + 1][:, x0 + 1]
    return (g00 * (1 - fx) + g01 * fx) * (1 - fy) + (g10 * (1 - fx) + g11 * fx) * fy


def _disks(shape: tuple[int, int], centers: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Boolean image of the union of disks (centers ``(n, 2)`` as (y, x), radii ``(n,)``)."""
    out = np.zeros(shape, dtype=bool)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    for (cy, cx), r in zip(centers, radii):
        y0, y1 = max(int(cy - r - 1), 0), min(int(cy + r + 2), shape[0])
        x0, x1 = max(int(cx - r - 1), 0), min(int(cx + r + 2), shape[1])
        if y0 < y1 and x0 < x1:
            patch = (yy[y0:y1, x0:x1] - cy) ** 2 + (xx[y0:y1, x0:x1] - cx) ** 2 <= r * r
            out[y0:y1, x0:x1] |= patch
    return out


def _paint(image: np.ndarray, where: np.ndarray, color: np.ndarray, opacity: float = 1.0) -> None:
    image[where] = (1 - opacity) * image[where] + opacity * color


def _stroma(rng: np.random.Generator, size: tuple[int, int], scale: float) -> np.ndarray:
    """The float ``(H, W, 3)`` background of a synthetic image, with the same statistics in both classes."""
    h, w = size
    shade = _smooth_noise(rng, size, max(4, int(16 * scale)))[..., None]
    image = _STROMA + (shade - 0.5) * 40.0 + rng.normal(0, 6, (h, w, 3))
    n_scattered = int(60 * scale * scale)
    scattered = _disks(
        size,
        rng.uniform([0, 0], [h, w], (n_scattered, 2)),
        rng.uniform(1.0, 2.2, n_scattered) * scale,
    )
    _paint(image, scattered, _NUCLEUS, 0.8)
    # Look-alikes in both classes: clusters of dark nuclei (inflammation, like malignant glands) and pale spaces
    # (vessels, fat, like benign lumina). They carry no class evidence but fool the eye and local features.
    for _ in range(int(rng.integers(2, 5))):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        n = int(12 * scale * scale)
        centers = np.stack([cy + rng.normal(0, 5 * scale, n), cx + rng.normal(0, 5 * scale, n)], 1)
        _paint(image, _disks(size, centers, rng.uniform(1.5, 3.0, n) * scale), _NUCLEUS * 0.6, 0.9)
    for _ in range(int(rng.integers(1, 4))):
        r = rng.uniform(3, 7) * scale
        _paint(image, _disks(size, rng.uniform([0, 0], [h, w], (1, 2)), np.array([r])), _LUMEN * 0.97, 0.8)
    return image


def synthetic_histology_sample(
    label: int, size: tuple[int, int] = (128, 128), rng: np.random.Generator | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """One image ``(H, W, 3)`` uint8 and its gland mask ``(H, W)`` uint8 (0 / 1) for class ``label`` (0 or 1)."""
    if label not in (0, 1):
        raise ValueError(f"label must be 0 (benign) or 1 (malignant), got {label}.")
    rng = rng if rng is not None else np.random.default_rng()
    h, w = size
    scale = min(h, w) / 128.0
    image = _stroma(rng, size, scale)
    # Glands: on a jittered 2 x 2 grid, each cell holding one with probability 0.85 (about 40 % of the image is
    # gland, as in GlaS); at least one per image.
    mask = np.zeros(size, dtype=bool)
    yy, xx = np.mgrid[:h, :w]
    occupied = rng.random(4) < 0.85
    occupied[rng.integers(0, 4)] = True
    for cell in np.flatnonzero(occupied):
        ch, cw = h / 2, w / 2
        ry, rx = rng.uniform(0.3, 0.48, 2) * np.array([ch, cw])
        cy = (cell // 2) * ch + ch / 2 + rng.uniform(-1, 1) * (ch / 2 - ry) * 0.8
        cx = (cell % 2) * cw + cw / 2 + rng.uniform(-1, 1) * (cw / 2 - rx) * 0.8
        theta = rng.uniform(0, np.pi)
        dy, dx = yy - cy, xx - cx
        u = (dy * np.cos(theta) + dx * np.sin(theta)) / ry
        v = (-dy * np.sin(theta) + dx * np.cos(theta)) / rx
        radius = np.sqrt(u * u + v * v)
        gland = (radius <= 1.0) & ~mask
        mask |= gland
        if label == 0:
            _paint(image, gland, _LUMEN * 0.97, 0.85)
            ring = gland & (radius >= 0.72)
            _paint(image, ring, np.array([200.0, 120.0, 175.0]), 0.9)
            angles = np.linspace(0, 2 * np.pi, int(18 * scale) + 8, endpoint=False)
            r_nuc = 0.84
            centers = np.stack(
                [
                    cy + r_nuc * (ry * np.cos(angles) * np.cos(theta) - rx * np.sin(angles) * np.sin(theta)),
                    cx + r_nuc * (ry * np.cos(angles) * np.sin(theta) + rx * np.sin(angles) * np.cos(theta)),
                ],
                1,
            )
            _paint(image, _disks(size, centers, np.full(len(angles), 1.8 * scale)), _NUCLEUS, 0.95)
        else:
            _paint(image, gland, np.array([150.0, 90.0, 165.0]), 0.85)
            n = int(gland.sum() / (14.0 * scale * scale)) + 1
            ys, xs = np.nonzero(gland)
            pick = rng.integers(0, len(ys), n)
            nuclei = _disks(size, np.stack([ys[pick], xs[pick]], 1), rng.uniform(1.8, 3.4, n) * scale) & gland
            _paint(image, nuclei, _NUCLEUS * 0.6, 0.95)
    return np.clip(image, 0, 255).astype(np.uint8), mask.astype(np.uint8)


def synthetic_volume_sample(
    label: int, size: tuple[int, int, int] = (32, 32, 32), rng: np.random.Generator | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """One grey volume ``(X, Y, Z)`` uint8 and its blob mask ``(X, Y, Z)`` uint8 (0 / 1) for class ``label``.

    A smooth, noisy background holds one to three ellipsoid blobs (about a third of the volume) of the same mean
    brightness in both classes: smooth blobs in class 0, speckled ones in class 1. Only the blobs tell the classes
    apart, so a model has to find them.
    """
    import torch

    if label not in (0, 1):
        raise ValueError(f"label must be 0 or 1, got {label}.")
    rng = rng if rng is not None else np.random.default_rng()
    coarse = torch.from_numpy(rng.random((1, 1, *(max(2, s // 8) for s in size)))).float()
    shade = torch.nn.functional.interpolate(coarse, size=size, mode="trilinear", align_corners=True)[0, 0].numpy()
    volume = 80.0 + 40.0 * shade + rng.normal(0, 6, size)
    grid = np.stack(np.meshgrid(*(np.arange(s) for s in size), indexing="ij"), -1).astype(np.float32)
    mask = np.zeros(size, dtype=bool)
    for _ in range(int(rng.integers(1, 4))):
        radii = rng.uniform(0.26, 0.4, 3) * np.array(size)
        center = rng.uniform(radii, np.array(size) - radii)
        mask |= (((grid - center) / radii) ** 2).sum(-1) <= 1.0
    texture = rng.normal(0, 40 if label == 1 else 5, size)
    volume[mask] = 170.0 + texture[mask]
    return np.clip(volume, 0, 255).astype(np.uint8), mask.astype(np.uint8)


def _samples(sample, num: int, size: tuple[int, ...], seed: int) -> list[dict[str, np.ndarray | int]]:
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(num):  # classes alternating: balanced
        image, mask = sample(i % 2, size, rng)
        samples.append({"image": image, "mask": mask, "label": i % 2})
    return samples


def make_synthetic_histology(
    num_images: int, size: tuple[int, int] = (128, 128), seed: int = 0
) -> list[dict[str, np.ndarray | int]]:
    """``num_images`` samples, classes alternating (balanced), each ``{"image": (H, W, 3) uint8, "mask": (H, W)
    uint8, "label": int}``; the same seed gives the same data."""
    return _samples(synthetic_histology_sample, num_images, size, seed)


def _save_png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(array).save(path)


def _save_nifti(path: Path, array: np.ndarray) -> None:
    import nibabel as nib

    nib.save(nib.Nifti1Image(array, np.eye(4)), str(path))


def _write(out_dir, sample, suffix, save, num_train: int, num_valid: int, size: tuple[int, ...], seed: int) -> Path:
    """Write a synthetic set as image and mask files (``<split>_<i><suffix>``, ``<split>_<i>_anno<suffix>`` with 255
    for the region) and a MONAI datalist ``datalist.json`` (``training`` / ``validation`` with ``image``, ``label``,
    ``mask``, paths relative to ``out_dir``); returns the datalist path. An existing datalist written with the same
    arguments is reused."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    datalist_path = out / "datalist.json"
    recipe = {"num_train": num_train, "num_valid": num_valid, "size": list(size), "seed": seed}
    if datalist_path.is_file():
        existing = json.loads(datalist_path.read_text())
        if existing.get("synthetic") == recipe and all(
            (out / item[k]).is_file()
            for split in ("training", "validation")
            for item in existing[split]
            for k in ("image", "mask")
        ):
            return datalist_path
    datalist: dict = {"synthetic": recipe, "labels": list(CLASS_NAMES)}
    for split, n, split_seed in (("training", num_train, seed), ("validation", num_valid, seed + 1)):
        items = []
        for i, item in enumerate(_samples(sample, n, tuple(size), split_seed)):
            image_path, mask_path = out / f"{split}_{i}{suffix}", out / f"{split}_{i}_anno{suffix}"
            save(image_path, item["image"])
            save(mask_path, item["mask"] * 255)
            items.append({"image": image_path.name, "label": int(item["label"]), "mask": mask_path.name})
        datalist[split] = items
    datalist_path.write_text(json.dumps(datalist, indent=1))
    return datalist_path


def write_synthetic_histology(
    out_dir: str | Path, num_train: int = 32, num_valid: int = 12, size: tuple[int, int] = (128, 128), seed: int = 0
) -> Path:
    """The 2D set (:func:`synthetic_histology_sample`) as PNG files and a datalist in ``out_dir`` (see ``_write``)."""
    return _write(out_dir, synthetic_histology_sample, ".png", _save_png, num_train, num_valid, size, seed)


def write_synthetic_volumes(
    out_dir: str | Path, num_train: int = 24, num_valid: int = 8, size: tuple[int, ...] = (32, 32, 32), seed: int = 0
) -> Path:
    """The 3D set (:func:`synthetic_volume_sample`) as NIfTI files and a datalist in ``out_dir`` (see ``_write``)."""
    return _write(out_dir, synthetic_volume_sample, ".nii.gz", _save_nifti, num_train, num_valid, size, seed)


def write_synthetic_slide(
    path: str | Path,
    rows: int = 8,
    cols: int = 12,
    tile: int = 256,
    *,
    distinct: int | None = None,
    seed: int = 0,
    mpp: float = 0.5,
) -> Path:
    """A whole-slide image made of the synthetic set: an oval of tissue on glass, ``rows x cols`` images of ``tile``
    pixels (:func:`synthetic_histology_sample`), benign everywhere but a malignant focus, written as a pyramidal tiled
    TIFF (:func:`~monai_wsl.data.slides.write_rgb_pyramid`) that OpenSlide reads, with its ground-truth gland mask
    beside it (``<stem>_anno.png`` at the slide's lowest level). An existing file is kept. For the whole-slide quick
    start: the quick-start model on a slide, where the glands it was trained to find are.

    ``distinct``, ``seed`` and ``mpp`` go by keyword. ``distinct``: draw at most this many images of each class and
    place them again at random (None: every place its own image). Drawing takes about 0.1 s an image of 512 pixels,
    so a slide of CAMELYON16's size (10,000 tissue patches of 512 pixels) takes minutes with ``distinct=64`` where it
    would take a quarter of an hour on one core without: a slide for timing, whose content repeats."""
    from PIL import Image

    from .slides import write_rgb_pyramid

    if distinct is not None and distinct < 1:
        raise ValueError(f"distinct must be None or at least 1, got {distinct}.")
    path = Path(path)
    anno = path.with_name(f"{path.stem}_anno.png")
    if path.is_file() and anno.is_file():
        return path
    rng = np.random.default_rng(seed)
    h, w = rows * tile, cols * tile
    rgb = np.full((h, w, 3), 242, np.uint8)
    mask = np.zeros((h, w), np.uint8)
    cy, cx = (rows - 1) / 2, (cols - 1) / 2
    focus = (rows * 0.35, cols * 0.7)  # the malignant focus
    drawn: dict[int, list] = {0: [], 1: []}  # with ``distinct``: the images of each class drawn so far
    for r in range(rows):
        for c in range(cols):
            if ((r - cy) / (rows / 2)) ** 2 + ((c - cx) / (cols / 2)) ** 2 > 1.0:
                continue  # glass
            label = int(((r - focus[0]) / 1.6) ** 2 + ((c - focus[1]) / 2.2) ** 2 <= 1.0)  # the malignant focus
            if distinct is None:
                image, glands = synthetic_histology_sample(label, (tile, tile), rng)
            elif len(drawn[label]) < distinct:
                drawn[label].append(synthetic_histology_sample(label, (tile, tile), rng))
                image, glands = drawn[label][-1]
            else:
                image, glands = drawn[label][rng.integers(distinct)]
            rgb[r * tile : (r + 1) * tile, c * tile : (c + 1) * tile] = image
            mask[r * tile : (r + 1) * tile, c * tile : (c + 1) * tile] = glands
    # the mask renamed into place first, the slide last: a slide file is always complete and has its mask, and
    # processes that write it at once (the ranks of torchrun) each rename complete files of their own
    with atomic_write(anno, path) as (anno_partial, partial):
        levels = write_rgb_pyramid(partial, rgb, mpp=mpp)
        lh, lw = levels[-1]
        Image.fromarray(mask * 255).resize((lw, lh), Image.NEAREST).save(anno_partial, format="PNG")
    return path
