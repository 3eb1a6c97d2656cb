"""Write what an evaluation or inference run found: one CSV row per image and a summary."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events

from monai_wsl.handlers.images import _filename, decollated_items

__all__ = ["ResultsWriter"]


def _scalar(x: Any) -> float | int | None:
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        return x.reshape(-1)[0].item() if x.numel() else None
    return x


class ResultsWriter:
    """Per-image results and their summary, written when the evaluator's epoch ends.

    ``<output_dir>/<per_image_file>``: one row per image with its file, the true label (when there is one), the
    predicted class, its probability and each class's probability, then every per-image metric the engine saved in
    ``engine.state.metric_details`` (metric handlers with ``save_details=True``, e.g. F1+ and F1- per image).
    ``<output_dir>/<summary_file>`` (JSON) holds ``engine.state.metrics`` (the means over images and pooled PxAP)
    and the image count, also logged as a table. An inference run without metrics writes only the rows.

    Args:
        output_dir: folder to write to (created).
        class_names: names of the classes, in index order.
        image_key, label_key, prob_key: keys of the per-image outputs / batch (after ``SplitPredictiond``).
        per_image_file, summary_file: file names; ``summary_file=None`` writes no summary.
    """

    def __init__(
        self,
        output_dir: str,
        class_names: list[str] | tuple[str, ...] | None = None,
        image_key: str = "image",
        label_key: str | None = "label",
        prob_key: str = "prob",
        per_image_file: str = "per_image.csv",
        summary_file: str | None = "summary.json",
    ) -> None:
        self.output_dir = Path(output_dir)
        self.class_names = list(class_names) if class_names else None
        self.image_key, self.label_key, self.prob_key = image_key, label_key, prob_key
        self.per_image_file, self.summary_file = per_image_file, summary_file
        self._rows: list[dict[str, Any]] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def reset(self, engine: Engine) -> None:
        self._rows = []

    def _name(self, index: int | None) -> str:
        if index is None or self.class_names is None or not 0 <= index < len(self.class_names):
            return ""
        return self.class_names[index]

    def collect(self, engine: Engine) -> None:
        for item in decollated_items(engine):
            row: dict[str, Any] = {"image": _filename(item, self.image_key, f"image_{len(self._rows)}")}
            if self.label_key and item.get(self.label_key) is not None:
                label = int(_scalar(item[self.label_key]))
                row.update(label=label, label_name=self._name(label))
            prob = item.get(self.prob_key)
            if prob is not None:
                prob = torch.as_tensor(prob).detach().float().cpu().reshape(-1)
                pred = int(prob.argmax())
                row.update(pred=pred, pred_name=self._name(pred), prob=round(float(prob[pred]), 6))
                for k, p in enumerate(prob.tolist()):
                    row[f"prob_{self._name(k) or k}"] = round(p, 6)
                if "label" in row:
                    row["correct"] = int(pred == row["label"])
            self._rows.append(row)

    def __call__(self, engine: Engine) -> None:
        if not self._rows:
            return
        details = getattr(engine.state, "metric_details", {}) or {}
        for name, values in details.items():
            values = torch.as_tensor(values).detach().float().cpu()
            if values.ndim == 0 or values.shape[0] != len(self._rows):
                continue  # not per image (e.g. a pooled metric)
            values = values.reshape(len(self._rows), -1)
            for row, v in zip(self._rows, values):
                cols = [name] if v.numel() == 1 else [f"{name}_{i}" for i in range(v.numel())]
                for col, x in zip(cols, v.tolist()):
                    row[col] = "" if math.isnan(x) else round(x, 6)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        columns: list[str] = []
        for row in self._rows:
            columns += [c for c in row if c not in columns]
        with open(self.output_dir / self.per_image_file, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self._rows)
        metrics = {k: _scalar(v) for k, v in engine.state.metrics.items() if _scalar(v) is not None}
        if self.summary_file and metrics:
            summary = {"images": len(self._rows), **{k: float(v) for k, v in metrics.items()}}
            (self.output_dir / self.summary_file).write_text(json.dumps(summary, indent=1))
            width = max(len(k) for k in summary)
            table = "\n".join(
                f"  {k:<{width}}  {v:.4f}" if isinstance(v, float) else f"  {k:<{width}}  {v}"
                for k, v in summary.items()
            )
            engine.logger.info(f"evaluation summary ({self.output_dir / self.summary_file}):\n{table}")
