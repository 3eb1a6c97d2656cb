"""Pictures of masks on images: what a pathologist looks at before trusting a number."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "display_image",
    "mask_overlay_panels",
    "overlay_grid",
    "legend",
    "tint",
    "contour",
    "slide_thumbnail",
    "to_uint8",
    "COLORS",
]

COLORS = {
    "pred": (0.0, 0.75, 0.85),  # teal: predicted region
    "contour": (1.0, 0.85, 0.0),  # yellow: ground-truth outline
    "tp": (0.15, 0.75, 0.25),  # green: true positive
    "fp": (0.9, 0.15, 0.15),  # red: false positive
    "fn": (0.2, 0.35, 0.95),  # blue: missed
}


def _plane(x: torch.Tensor, transpose: bool) -> torch.Tensor:
    """``(C, *spatial)`` -> ``(C, H, W)``: the middle slice of the last axis for 3D; PIL-read 2D data are
    ``(C, W, H)`` and are transposed when ``transpose``."""
    x = torch.as_tensor(x).detach().float().cpu()
    if x.ndim == 4:
        x = x[..., x.shape[-1] // 2]
    if x.ndim != 3:
        raise ValueError(f"expected a channel-first 2D or 3D array, got shape {tuple(x.shape)}.")
    return x.transpose(-1, -2) if transpose else x


def display_image(
    image: torch.Tensor, value_range: Sequence[float] | None = (-1.0, 1.0), transpose: bool = True
) -> torch.Tensor:
    """``(C, *spatial)`` image -> ``(3, H, W)`` RGB in [0, 1] for display.

    ``value_range`` maps the given range to [0, 1] (the recipe normalises to [-1, 1]); ``None`` min-max scales.
    Grey images are repeated to RGB.
    """
    x = _plane(image, transpose)
    if value_range is None:
        lo, hi = x.min(), x.max()
    else:
        lo, hi = value_range
    x = ((x - lo) / max(float(hi - lo), 1e-8)).clamp(0, 1)
    if x.shape[0] == 1:
        x = x.repeat(3, 1, 1)
    return x[:3]


def contour(mask: torch.Tensor) -> torch.Tensor:
    """Boundary pixels of a binary ``(H, W)`` mask."""
    m = mask.float()[None, None]
    eroded = -F.max_pool2d(-m, 3, stride=1, padding=1)
    return (m - eroded)[0, 0] > 0


def _enlarge(mask: torch.Tensor, zoom: int) -> torch.Tensor:
    return mask.repeat_interleave(zoom, 0).repeat_interleave(zoom, 1)


def tint(rgb: torch.Tensor, where: torch.Tensor, color: Sequence[float], alpha: float = 0.45) -> torch.Tensor:
    """``(3, H, W)`` RGB in [0, 1] with the pixels of the ``(H, W)`` bool mask ``where`` blended towards ``color``."""
    c = torch.tensor(color).view(3, 1, 1)
    return torch.where(where[None], (1 - alpha) * rgb + alpha * c, rgb)


def mask_overlay_panels(
    image: torch.Tensor,
    pred: torch.Tensor,
    gt: torch.Tensor | None = None,
    threshold: float = 0.5,
    value_range: Sequence[float] | None = (-1.0, 1.0),
    transpose: bool = True,
    alpha: float = 0.45,
    min_side: int = 128,
) -> torch.Tensor:
    """Side-by-side panels ``(3, H, n * W)`` in [0, 1]: the image; the predicted mask (``pred >= threshold``, teal)
    with the ground-truth outline (yellow); and, with ``gt``, the errors (true positive green, false positive red,
    missed blue).

    Args:
        image: ``(C, *spatial)``.
        pred: ``(1, *spatial)`` soft or binary mask.
        gt: ``(1, *spatial)`` binary ground truth, optional.
        min_side: smaller pictures (a volume's 32 x 32 middle slice) are enlarged, pixels as blocks, to at least this
            many pixels a side.
    """
    rgb = display_image(image, value_range, transpose)
    p = _plane(pred, transpose)[0] >= threshold
    if p.shape != rgb.shape[1:]:
        raise ValueError(f"pred {tuple(p.shape)} and image {tuple(rgb.shape[1:])} differ in size.")
    zoom = -(-min_side // min(p.shape))
    if zoom > 1:
        rgb, p = rgb.repeat_interleave(zoom, 1).repeat_interleave(zoom, 2), _enlarge(p, zoom)
    predicted = tint(rgb, p, COLORS["pred"], alpha)
    panels = [rgb]
    if gt is not None:
        g = _enlarge(_plane(gt, transpose)[0] > 0, max(zoom, 1))
        outline = contour(g)
        predicted = tint(predicted, outline, COLORS["contour"], 1.0)
        errors = tint(rgb, p & g, COLORS["tp"], alpha)
        errors = tint(errors, p & ~g, COLORS["fp"], alpha)
        errors = tint(errors, ~p & g, COLORS["fn"], alpha)
        panels += [predicted, errors]
    else:
        panels.append(predicted)
    gap = torch.ones(3, rgb.shape[1], max(2, rgb.shape[2] // 100))
    out = [panels[0]]
    for panel in panels[1:]:
        out += [gap, panel]
    return torch.cat(out, dim=2)


LEGEND = (
    ("predicted region", "pred"),
    ("ground-truth outline", "contour"),
    ("found", "tp"),
    ("false positive", "fp"),
    ("missed", "fn"),
)


def legend(width: int, truth: bool = True) -> torch.Tensor:
    """A key to the overlay colours, ``(3, h, width)`` in [0, 1]: a coloured square and its name per entry, wrapped
    to ``width`` (without ``truth``: the predicted region only)."""
    from PIL import Image, ImageDraw

    entries = LEGEND if truth else LEGEND[:1]
    line, box, pad = 14, 9, 6
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    sizes = [box + 4 + int(draw.textlength(name)) + pad for name, _ in entries]
    lines, x = 1, 0
    for size in sizes:
        if x and x + size > width:
            lines, x = lines + 1, 0
        x += size
    canvas = Image.new("RGB", (width, lines * line + 2), "white")
    draw = ImageDraw.Draw(canvas)
    x, y = 2, 2
    for (name, key), size in zip(entries, sizes):
        if x > 2 and x + size > width:
            x, y = 2, y + line
        color = tuple(int(255 * c) for c in COLORS[key])
        draw.rectangle([x, y + 1, x + box, y + 1 + box], fill=color, outline=(80, 80, 80))
        draw.text((x + box + 4, y), name, fill="black")
        x += size
    return torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1).float() / 255


def overlay_grid(rows: Sequence[torch.Tensor], truth: bool | None = True) -> torch.Tensor:
    """Stack ``(3, H_i, W_i)`` rows vertically (padded with white to the widest) -> ``(3, H, W)``, with the
    :func:`legend` of the colours below (``truth``: whether the rows show a ground truth; ``None``: no legend)."""
    if not rows:
        raise ValueError("no rows to draw.")
    width = max(r.shape[2] for r in rows)
    padded = []
    for r in rows:
        pad = torch.ones(3, r.shape[1], width - r.shape[2])
        padded += [torch.cat([r, pad], 2), torch.ones(3, 4, width)]
    if truth is not None:
        padded.append(legend(width, truth))
    return torch.cat(padded if truth is not None else padded[:-1], 1)


def to_uint8(rgb: torch.Tensor) -> np.ndarray:
    """``(3, H, W)`` in [0, 1] -> ``(H, W, 3)`` uint8 for PIL."""
    return (rgb.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


def slide_thumbnail(rgb: np.ndarray, prob: np.ndarray, threshold: float = 0.5, size: int = 1024) -> np.ndarray:
    """A slide's thumbnail: its low-resolution ``(H, W, 3)`` uint8 picture brought to at most ``size`` pixels on the
    long side, beside the same with the regions ``prob >= threshold`` over it (``prob``: the map, any size, resized
    to the picture; tinted and outlined as the bundle's other overlays), the :func:`legend` below. ``(h, w, 3)``
    uint8."""
    from PIL import Image

    image = Image.fromarray(rgb)
    scale = size / max(image.size)
    if scale < 1:
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BILINEAR)
    base = np.asarray(image, np.float32) / 255
    p = np.asarray(Image.fromarray(prob.astype(np.float32)).resize(image.size, Image.BILINEAR))
    color = np.asarray(COLORS["pred"], np.float32)
    inside = p >= threshold  # the predicted region, tinted as in the bundle's other overlays
    over = base.copy()
    over[inside] = 0.55 * base[inside] + 0.45 * color
    edge = contour(torch.from_numpy(inside)).numpy()
    over[edge] = color
    gap = np.ones((base.shape[0], 4, 3), np.float32)
    panels = np.concatenate([base, gap, over], 1)
    key = legend(panels.shape[1], truth=False).permute(1, 2, 0).numpy()
    out = np.concatenate([panels, key], 0)
    return (np.clip(out, 0, 1) * 255).astype(np.uint8)
