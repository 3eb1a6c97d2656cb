"""Per-image scores written as they are computed: evaluations of thousands of patches keep a bounded memory, and an
interrupted evaluation leaves the rows of the images already scored."""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.metrics import compute_confusion_matrix_metric, compute_dice, compute_iou, get_confusion_matrix

from monai_wsl.utils import atomic_write

from .images import decollated_items, item_filename

__all__ = ["PerImageCSVWriter", "image_scores"]

logger = logging.getLogger(__name__)

#: the scores of a row, with the rule that makes them NaN (left out of the means)
SCORES = {
    "f1_pos": "no foreground in the ground truth (a normal patch)",
    "f1_neg": "no background in the ground truth (a patch wholly tumour)",
    "iou_pos": "no foreground in the ground truth",
    "iou_neg": "no background in the ground truth",
    "fpr": "no background in the ground truth",
}


def image_scores(seg: torch.Tensor, gt: torch.Tensor) -> dict[str, float]:
    """F1+, F1-, IoU+, IoU- and the pixel false-positive rate of one image (``(1, *spatial)`` binary maps), NaN
    where the ground-truth region the score is about is empty (MONAI's ``ignore_empty=True``)."""
    s, g = seg.float()[None], gt.float()[None]
    return {
        "f1_pos": float(compute_dice(s, g, ignore_empty=True)),
        "f1_neg": float(compute_dice(1 - s, 1 - g, ignore_empty=True)),
        "iou_pos": float(compute_iou(s, g, ignore_empty=True)),
        "iou_neg": float(compute_iou(1 - s, 1 - g, ignore_empty=True)),
        "fpr": float(compute_confusion_matrix_metric("fpr", get_confusion_matrix(s, g).double())),
    }


class PerImageCSVWriter:
    """Write one CSV row per image as each batch is scored, flushed at once, and log, at the end, each score's mean
    over the images where it is defined with how many images that is: F1+ is NaN on an image without foreground
    (a normal patch) and F1- on one without background (MONAI's ``ignore_empty``), so on CAMELYON16 F1+ is the mean
    over the metastatic patches and F1- over the patches with some background, the paper's conventions.

    Columns: ``image``, ``label``, ``predicted``, ``prob_<class>``, ``foreground`` (the ground truth's share of the
    pixels), ``f1_pos``, ``f1_neg``, ``iou_pos``, ``iou_neg``, ``fpr``. Memory: a few running sums, whatever the
    number of images. ``summary.csv`` beside it holds, per score, the mean, the images counted and those left out.

    Args:
        output_dir: folder of ``filename`` (created).
        class_names: the classes, for the probability columns.
        filename: the per-image CSV.
        seg_key, gt_key, prob_key, label_key, image_key: keys of the per-image outputs / batch.
    """

    def __init__(
        self,
        output_dir: str,
        class_names: Any = ("benign", "malignant"),
        filename: str = "scores.csv",
        seg_key: str = "seg",
        gt_key: str = "gt",
        prob_key: str = "prob",
        label_key: str = "label",
        image_key: str = "image",
    ) -> None:
        self.output_dir = Path(output_dir)
        self.class_names = [str(c) for c in class_names]
        self.filename = filename
        self.seg_key, self.gt_key, self.prob_key = seg_key, gt_key, prob_key
        self.label_key, self.image_key = label_key, image_key
        self._file: Any = None
        self._writer: Any = None
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}
        self._images = 0
        self._correct = 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._rows)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._finish)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self._close)

    def _close(self, engine: Engine | None = None, error: BaseException | None = None) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if error is not None:  # Ignite's exception event: the handler saw it, the run still fails with it
            raise error

    def _start(self, engine: Engine) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.output_dir / self.filename, "w", newline="")
        self._writer = csv.writer(self._file)
        probs = [f"prob_{c}" for c in self.class_names]
        self._writer.writerow(["image", "label", "predicted", *probs, "foreground", *SCORES])
        self._sums = {k: 0.0 for k in SCORES}
        self._counts = {k: 0 for k in SCORES}
        self._images = self._correct = 0

    def _rows(self, engine: Engine) -> None:
        for i, item in enumerate(decollated_items(engine)):
            seg = torch.as_tensor(item[self.seg_key]).detach().cpu()
            gt = torch.as_tensor(item[self.gt_key]).detach().cpu()
            scores = image_scores(seg, gt)
            prob = torch.as_tensor(item[self.prob_key]).detach().cpu().flatten().tolist()
            label = int(torch.as_tensor(item[self.label_key]).flatten()[0])
            predicted = int(torch.tensor(prob).argmax())
            name = item_filename(item, self.image_key, f"image_{engine.state.iteration}_{i}")
            self._writer.writerow(
                [name, label, predicted, *(f"{p:.6f}" for p in prob), f"{float(gt.float().mean()):.6f}"]
                + [f"{v:.6f}" if not math.isnan(v) else "nan" for v in scores.values()]
            )
            for k, v in scores.items():
                if not math.isnan(v):
                    self._sums[k] += v
                    self._counts[k] += 1
            self._images += 1
            self._correct += int(predicted == label)
        self._file.flush()

    def summary(self) -> dict[str, dict[str, float | int]]:
        """Per score: ``mean`` over the images where it is defined, ``images`` counted, ``left_out`` (NaN)."""
        out: dict[str, dict[str, float | int]] = {
            "accuracy": {"mean": self._correct / max(self._images, 1), "images": self._images, "left_out": 0}
        }
        for k in SCORES:
            n = self._counts[k]
            out[k] = {"mean": self._sums[k] / n if n else math.nan, "images": n, "left_out": self._images - n}
        return out

    def _finish(self, engine: Engine) -> None:
        self._close()
        summary = self.summary()
        with atomic_write(self.output_dir / "summary.csv") as (tmp,), open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["score", "mean", "images", "left_out", "left_out_because"])
            for k, v in summary.items():
                writer.writerow([k, f"{v['mean']:.6f}", v["images"], v["left_out"], SCORES.get(k, "")])
        lines = [
            f"{k}: {v['mean']:.4f} over {v['images']} image(s)"
            + (f" ({v['left_out']} left out: {SCORES[k]})" if v["left_out"] else "")
            for k, v in summary.items()
        ]
        logger.info("per-image scores in %s; means:\n  %s", self.output_dir / self.filename, "\n  ".join(lines))
