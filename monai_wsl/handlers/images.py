"""Overlays of predicted and true masks: in TensorBoard during training, as PNG files at evaluation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events

from monai_wsl.visualize import mask_overlay_panels, overlay_grid, to_uint8

__all__ = ["TensorBoardOverlayHandler", "OverlaySaver", "decollated_items", "item_filename"]


def decollated_items(engine: Engine) -> list[dict[str, Any]]:
    """Per-image dicts of the current iteration, output and batch merged (output wins). Needs the engine's
    ``decollate=True`` (MONAI's default)."""
    outputs, batch = engine.state.output, engine.state.batch
    if not isinstance(outputs, list):
        raise ValueError("overlay handlers need decollated per-image outputs: keep the engine's decollate=True.")
    batch = batch if isinstance(batch, list) else [{}] * len(outputs)
    return [{**b, **o} for b, o in zip(batch, outputs)]


def item_filename(item: dict[str, Any], key: str, fallback: str) -> str:
    """The file ``item[key]`` was loaded from (its meta data's ``filename_or_obj``), else ``fallback``."""
    meta = getattr(item.get(key), "meta", None) or item.get(f"{key}_meta_dict") or {}
    name = meta.get("filename_or_obj")
    return str(name) if name else fallback


def item_panels(handler: Any, item: dict[str, Any]) -> torch.Tensor:
    """One image's overlay panels with an overlay handler's keys and settings (threshold, value range, transpose)."""
    gt = item.get(handler.label_key) if handler.label_key else None
    return mask_overlay_panels(
        item[handler.image_key],
        item[handler.pred_key],
        gt,
        threshold=handler.threshold,
        value_range=handler.value_range,
        transpose=handler.transpose,
    )


class TensorBoardOverlayHandler:
    """Every ``interval`` epochs, write a picture of the first ``max_images`` images of the epoch to TensorBoard:
    image | predicted mask (teal) with the ground-truth outline (yellow) | errors (true positive green, false positive
    red, missed blue). Attach it to the validation evaluator; the step is the epoch (the trainer's, through
    ``ValidationHandler``).

    Args:
        summary_writer: a ``SummaryWriter`` to share; or ``log_dir`` to open one.
        log_dir: folder for a new writer when ``summary_writer`` is None.
        interval: write every N epochs.
        max_images: images per picture.
        image_key, pred_key, label_key: keys of the per-image outputs/batch (``label_key=None``: no ground truth).
        value_range: range of the network input, mapped to black..white (the recipe's [-1, 1]).
        transpose: PIL-read 2D images are ``(C, W, H)``; transpose to show them upright.
        tag: TensorBoard image tag.
        threshold: the mask is ``pred >= threshold`` (the bundle's ``threshold``, as its metrics and saved masks).
    """

    def __init__(
        self,
        summary_writer: Any = None,
        log_dir: str = "./runs",
        interval: int = 1,
        max_images: int = 4,
        image_key: str = "image",
        pred_key: str = "pred",
        label_key: str | None = "mask",
        value_range: tuple[float, float] | None = (-1.0, 1.0),
        transpose: bool = True,
        tag: str = "overlay",
        threshold: float = 0.5,
    ) -> None:
        if summary_writer is None:
            from torch.utils.tensorboard import SummaryWriter

            summary_writer = SummaryWriter(log_dir=log_dir)
        self.writer = summary_writer
        self.interval, self.max_images = max(1, int(interval)), max_images
        self.image_key, self.pred_key, self.label_key = image_key, pred_key, label_key
        self.value_range, self.transpose, self.tag = value_range, transpose, tag
        self.threshold = float(threshold)
        self._rows: list[torch.Tensor] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def reset(self, engine: Engine) -> None:
        self._rows = []

    def collect(self, engine: Engine) -> None:
        if engine.state.epoch % self.interval or len(self._rows) >= self.max_images:
            return
        for item in decollated_items(engine)[: self.max_images - len(self._rows)]:
            self._rows.append(item_panels(self, item))

    def __call__(self, engine: Engine) -> None:
        if self._rows:
            grid = overlay_grid(self._rows, truth=self.label_key is not None)
            self.writer.add_image(self.tag, grid, engine.state.epoch, dataformats="CHW")
            self.writer.flush()
        self._rows = []


class OverlaySaver:
    """Save one overlay PNG per image (image | prediction + ground-truth outline | errors) to ``output_dir``,
    named after the image file: ``<name>_overlay.png``.

    Args:
        output_dir: folder to write to (created).
        image_key, pred_key, label_key, value_range, transpose, threshold: as :class:`TensorBoardOverlayHandler`.
    """

    def __init__(
        self,
        output_dir: str,
        image_key: str = "image",
        pred_key: str = "pred",
        label_key: str | None = "mask",
        value_range: tuple[float, float] | None = (-1.0, 1.0),
        transpose: bool = True,
        threshold: float = 0.5,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.image_key, self.pred_key, self.label_key = image_key, pred_key, label_key
        self.value_range, self.transpose, self.threshold = value_range, transpose, float(threshold)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        from PIL import Image

        self.output_dir.mkdir(parents=True, exist_ok=True)
        for i, item in enumerate(decollated_items(engine)):
            panels = item_panels(self, item)
            stem = Path(item_filename(item, self.image_key, f"image_{engine.state.iteration}_{i}")).name.split(".")[0]
            truth = bool(self.label_key) and item.get(self.label_key) is not None
            picture = overlay_grid([panels], truth=truth)  # with the key to the colours
            Image.fromarray(to_uint8(picture)).save(self.output_dir / f"{stem}_overlay.png")
