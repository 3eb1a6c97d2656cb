"""The MONAI Label tasks that serve the bundle's localizer: on whole slides, a region of a slide in (MONAI Label's
``/infer/wsi_v2/{model}`` from QuPath or the Digital Slide Archive, or ``/infer/{model}`` with ``location``, ``size``
and ``level``), the regions of the localizer's mask out, as polygons in level-0 pixels; on images (``/infer/{model}``
with a GlaS BMP, JPG or PNG), the bundle's ``inference.json`` through MONAI Label's own ``BundleInferTask``, the label
map out. :class:`ImagesAndSlidesInferTask` serves both under one model name.

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

from monai_wsl.apps.slide_region import (
    DEFAULT_LABEL_COLOR,
    build_slide_inferer,
    infer_slide_region,
    is_region_request,
)
from monai_wsl.data.check import DataError
from monai_wsl.inferers.backends import with_backend

_basic_infer, _has_monailabel = optional_import("monailabel.tasks.infer.basic_infer")
if not _has_monailabel:
    raise ImportError(
        "monai_wsl.apps.monailabel needs MONAI Label: pip install monailabel (in its own environment, with "
        "monai_wsl installed in it; see bundle/docs/README.md, 'MONAI Label'). The region inference itself, "
        "monai_wsl.apps.infer_slide_region, does not."
    )

from fastapi import HTTPException  # noqa: E402  (monailabel's own dependency)
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType  # noqa: E402
from monailabel.tasks.infer.basic_infer import BasicInferTask  # noqa: E402
from monailabel.tasks.infer.bundle import BundleInferTask  # noqa: E402
from monailabel.transform.writer import PolygonWriter  # noqa: E402

__all__ = ["BundleImageInferTask", "ImagesAndSlidesInferTask", "SlideRegionInferTask"]

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


class BundleImageInferTask(BundleInferTask):
    """MONAI Label's ``BundleInferTask`` (the task of its ``monaibundle`` app) on this bundle's ``inference.json``,
    serving ``model_path`` only: its network is built from the model card beside it, and MONAI Label's model list
    offers that one file (a training's checkpoints beside it in ``models/`` are not served).

    Args:
        bundle_root: the bundle folder (``configs/inference.json``, ``configs/metadata.json``).
        model_path: the trained model (default: ``<bundle_root>/models/model.pt``).
        conf: MONAI Label's app configuration (``--conf`` values).
    """

    def __init__(self, bundle_root: str | Path, model_path: str | Path | None = None, conf: dict | None = None):
        self.model_path = Path(model_path) if model_path is not None else Path(bundle_root) / "models" / "model.pt"
        self._backend_networks: dict[str, tuple] = {}  # device -> (MONAI Label's network, the module that runs it)
        self._backend_lock = threading.Lock()
        super().__init__(str(bundle_root), dict(conf or {}))
        if self.valid:
            self.path = [str(self.model_path)]
            self._config["model_filename"] = [self.model_path.name]

    def _load_bundle_config(self, path: str, config: str) -> Any:
        parser = super()._load_bundle_config(path, config)
        parser.config["checkpoint"] = str(self.model_path)  # the network (its card) and the weights of this model
        return parser

    def _get_network(self, device: str, data: Any) -> Any:
        """MONAI Label's network (``network_def`` with the model's weights, loaded again when the file changes), run
        by the bundle's ``inference_backend`` as ``inference.json`` runs it: on a CPU, by default, its ONNX export
        (written beside the model) in ONNX Runtime."""
        network = super()._get_network(device, data)
        if network is None:
            return None
        with self._backend_lock:  # MONAI Label keeps a network per device; a new one when the model file changed
            cached = self._backend_networks.get(device)
            if cached is None or cached[0] is not network:
                backend = self.bundle_config.get_parsed_content("inference_backend")
                wrapped = with_backend(network, backend, device, checkpoint=self.model_path)
                self._backend_networks[device] = cached = (network, wrapped)
            return cached[1]


class ImagesAndSlidesInferTask(InferTask):
    """One MONAI Label model for images and slides, as MONAI Label's pathology models are: a request for a region of
    a slide (:func:`~monai_wsl.apps.is_region_request`: a ``location`` or ``size``, or a slide file; every tile of
    ``/infer/wsi_v2``) goes to ``slides``, any other (an image) to ``images``. ``/info`` shows the slide task's
    settings (``pathology``, the threshold) with the image task's model file."""

    def __init__(self, images: BundleImageInferTask, slides: SlideRegionInferTask) -> None:
        super().__init__(
            type=slides.type,
            labels=slides.labels,
            dimension=slides.dimension,
            description="Weakly-supervised localizer (max-min uncertainty): the mask of an image, or its regions over "
            "a slide region",
            config={**(images.config() if images.is_valid() else {}), **slides.config()},
        )
        self.images, self.slides = images, slides

    def info(self) -> dict[str, Any]:
        return {**super().info(), "pathology": True}

    def is_valid(self) -> bool:
        return self.slides.is_valid()

    def get_path(self, validate: bool = True) -> Any:
        return self.slides.get_path(validate)

    def __call__(self, request: dict[str, Any]) -> tuple[Any, dict]:
        if is_region_request(request):
            return self.slides(request)
        if not self.images.is_valid():
            raise HTTPException(
                status_code=400,
                detail=f"images are served with the bundle's inference.json and {self.images.model_path}, which "
                "MONAI Label could not load (see the server log): serve slide regions only, or train the bundle",
            )
        return self.images(request)
