"""The MONAI Label task that serves the bundle's localizer on whole slides: a region of a slide in (MONAI Label's
``/infer/wsi_v2/{model}`` from QuPath or the Digital Slide Archive, or ``/infer/{model}`` with ``location``, ``size``
and ``level``), the regions of the localizer's mask out, as polygons in level-0 pixels.

This module needs ``monailabel`` (``pip install monailabel``, in its own environment: it pulls its own torch); the
rest of ``monai_wsl`` does not. The work itself is :func:`monai_wsl.apps.infer_slide_region`, which needs no
``monailabel``. ``bundle/monailabel/main.py`` is the MONAI Label app that registers this task.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

import torch
from monai.utils import optional_import

from monai_wsl.apps.slide_region import DEFAULT_LABEL_COLOR, build_slide_inferer, infer_slide_region
from monai_wsl.data.check import DataError

_basic_infer, _has_monailabel = optional_import("monailabel.tasks.infer.basic_infer")
if not _has_monailabel:
    raise ImportError(
        "monai_wsl.apps.monailabel needs MONAI Label: pip install monailabel (in its own environment, with "
        "monai_wsl installed in it; see bundle/docs/README.md, 'MONAI Label'). The region inference itself, "
        "monai_wsl.apps.infer_slide_region, does not."
    )

from fastapi import HTTPException  # noqa: E402  (monailabel's own dependency)
from monailabel.interfaces.tasks.infer_v2 import InferType  # noqa: E402
from monailabel.tasks.infer.basic_infer import BasicInferTask  # noqa: E402
from monailabel.transform.writer import PolygonWriter  # noqa: E402

__all__ = ["SlideRegionInferTask"]

logger = logging.getLogger(__name__)


class SlideRegionInferTask(BasicInferTask):
    """MONAI Label inference of the bundle's localizer on a region of a slide (MONAI Label's pathology convention:
    ``image`` the slide, ``location`` ``(x, y)`` in level-0 pixels, ``size`` ``(w, h)`` in pixels of ``level``).

    The region runs through :meth:`~monai_wsl.inferers.SlideInferer.infer_region`'s path, built from the bundle's own
    ``inference.json`` + ``inference_wsi.json`` (:func:`~monai_wsl.apps.build_slide_inferer`), so MONAI Label and
    ``python -m monai.bundle run ... inference_wsi.json`` share one definition (patch size, overlap, preprocessing,
    threshold). Each request gives MONAI Label's result for a tile: ``pred`` the ``(H, W)`` uint8 label map
    (1 = ``region_name``) and ``result["annotation"]`` the regions ``M >= threshold`` as polygons in level-0 pixels
    (:func:`~monai_wsl.apps.region_annotation`), which ``infer_wsi`` gathers into DSA JSON, ASAP XML or JSON; the
    tile's slide-level class probabilities go in ``result["class_probabilities"]``. The request's ``threshold`` and
    ``min_poly_area`` are honoured. A bad request (a missing slide, a level it does not have, a region off the slide)
    is answered with HTTP 400 and a message that names the slide and the fix.

    Args:
        bundle_root: the bundle folder (``configs/inference.json``, ``configs/inference_wsi.json``).
        model_path: the trained model (default: ``<bundle_root>/models/model.pt``).
        description: shown by MONAI Label's ``/info``.
        overrides: bundle config values by id (e.g. ``{"patch_size": 256}``).
        kwargs: other ``BasicInferTask`` arguments (``config``, ``preload``...).
    """

    def __init__(
        self,
        bundle_root: str | Path,
        model_path: str | Path | None = None,
        description: str = "Weakly-supervised localizer (max-min uncertainty): its regions over a slide region",
        overrides: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        from monai.bundle import ConfigParser

        self.bundle_root = Path(bundle_root)
        model_path = Path(model_path) if model_path is not None else self.bundle_root / "models" / "model.pt"
        self.overrides = dict(overrides or {})
        parser = ConfigParser()
        parser.read_config([str(self.bundle_root / "configs" / n) for n in ("inference.json", "inference_wsi.json")])
        self.region_name = str(self.overrides.get("region_name", parser["region_name"]))
        config: dict[str, Any] = {"threshold": float(self.overrides.get("threshold", parser["threshold"]))}
        if not torch.cuda.is_available():
            # MONAI Label 0.8.5's infer_wsi spreads tiles over the CUDA devices unless multi_gpu is false, and
            # fails on a machine without one (an empty device list): run the tiles on the request's device instead
            config["multi_gpu"] = False
        config.update(kwargs.pop("config", None) or {})
        super().__init__(
            path=str(model_path),
            network=None,
            type=InferType.SEGMENTATION,
            labels={self.region_name: 1},
            dimension=2,
            description=description,
            config=config,
            **kwargs,
        )
        self._inferers: dict[str, tuple[Any, float]] = {}
        self._lock = threading.Lock()  # MONAI Label's tile threads: one region on the model at a time

    def info(self) -> dict[str, Any]:
        d = super().info()
        d["pathology"] = True  # as MONAI Label's pathology tasks: QuPath / DSA list it for slides
        return d

    def pre_transforms(self, data: Any = None) -> list:
        return []  # the slide region is read by infer_slide_region (its slide opened once) and run patch by patch

    def post_transforms(self, data: Any = None) -> list:
        return []  # the threshold and polygons are made in run_inferer, by infer_slide_region

    def slide_inferer(self, device: str) -> Any:
        """The bundle's ``SlideInferer`` on ``device``, built once and rebuilt when the model file changes."""
        path = self.get_path()
        mtime = os.stat(path).st_mtime
        cached = self._inferers.get(device)
        if cached is None or cached[1] != mtime:
            logger.info(f"building the slide inferer of {self.bundle_root} with {path} on {device}")
            inferer = build_slide_inferer(self.bundle_root, path, device, self.overrides)
            self._inferers[device] = (inferer, mtime)
        return self._inferers[device][0]

    def run_inferer(self, data: dict[str, Any], convert_to_batch: bool = True, device: str = "cuda") -> dict:
        """``SlideInferer.infer_region`` on the request's region: ``data["pred"]`` the label map, ``data["result"]``
        MONAI Label's annotation of the region (level-0 polygons) and the class probabilities."""
        try:
            with self._lock:
                out = infer_slide_region(self.slide_inferer(device), data, self.region_name, DEFAULT_LABEL_COLOR)
        except (DataError, FileNotFoundError) as e:
            logger.error(str(e))
            raise HTTPException(status_code=400, detail=str(e)) from e
        data[self.output_label_key] = out["pred"]
        result = data.get(self.output_json_key) or {}
        result.update({"annotation": out["annotation"], "class_probabilities": out["class_probabilities"]})
        data[self.output_json_key] = result
        return data

    def writer(self, data: dict[str, Any], extension: Any = None, dtype: Any = None) -> tuple[Any, dict]:
        # as MONAI Label's pathology tasks: the tile's JSON for infer_wsi, or one DSA / ASAP file for a direct request
        return PolygonWriter(label=self.output_label_key, json=self.output_json_key)(data)
