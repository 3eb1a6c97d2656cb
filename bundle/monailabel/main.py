"""A MONAI Label app that serves the monai_wsl bundle's localizer on images and whole slides: ``/infer/
wsl_histology_segmentation?image=ID`` gives an image's label map (the bundle's ``inference.json``), and QuPath or the
Digital Slide Archive ask ``/infer/wsi_v2/wsl_histology_segmentation`` for a region of a slide and get the regions of
the localizer's mask back, as polygons in level-0 pixels (DSA JSON, ASAP XML or JSON). An id that is neither in the
studies folder nor a file on the server is answered 400 naming it.

    mkdir -p ~/apps/wsl && cp bundle/monailabel/main.py ~/apps/wsl/
    monailabel start_server --app ~/apps/wsl --studies FOLDER_OF_IMAGES_OR_SLIDES --conf bundle PATH_TO/bundle \\
        --host 127.0.0.1 --port 8000

(MONAI Label writes its log and folders into the app's folder: a copy keeps them out of the clone.) ``--conf bundle``
is the bundle folder (default: the folder above this app, for an app started where it is), ``--conf model`` the
trained model (default: ``<bundle>/models/model.pt``), ``--conf name`` the model's name in MONAI Label (default
``wsl_histology_segmentation``). The task is :class:`monai_wsl.apps.monailabel.ImagesAndSlidesInferTask`: slide
regions go to ``SlideRegionInferTask`` (its ``SlideInferer`` built from the bundle's ``inference.json`` +
``inference_wsi.json``), images to MONAI Label's own ``BundleInferTask`` on ``inference.json``. There is no trainer:
the model learns from image-level labels, which MONAI Label's trainers do not give; train with the bundle
(``python -m monai.bundle run --config_file bundle/configs/train.json``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import monailabel
from fastapi import HTTPException
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.train import TrainTask

import monai_wsl
from monai_wsl.apps import check_region_request, region_tiles, unknown_image_message
from monai_wsl.apps.monailabel import BundleImageInferTask, ImagesAndSlidesInferTask, SlideRegionInferTask
from monai_wsl.data import DataError
from monai_wsl.model_card import log_synthetic_model_warning

logger = logging.getLogger(__name__)

DEFAULT_NAME = "wsl_histology_segmentation"


class WSLHistologyApp(MONAILabelApp):
    """The bundle's localizer as one MONAI Label model (``--conf name``) for images and regions of slides."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        self.bundle_root = Path(conf.get("bundle") or Path(app_dir).resolve().parent).expanduser().resolve()
        model = conf.get("model")
        self.model_path = Path(model).expanduser().resolve() if model else self.bundle_root / "models" / "model.pt"
        self.model_name = conf.get("name", DEFAULT_NAME)
        if not (self.bundle_root / "configs" / "inference_wsi.json").is_file():
            raise FileNotFoundError(
                f"{self.bundle_root} is not the monai_wsl bundle (no configs/inference_wsi.json there): pass "
                "--conf bundle PATH_TO/monai_wsl/bundle"
            )
        if monai_wsl.__file__ is None:  # a folder named monai_wsl on PYTHONPATH (MONAI Label's launcher adds the
            raise ImportError(  # folder above its environment) shadows the installed package
                f"'import monai_wsl' found the folder {list(monai_wsl.__path__)}, not the installed package: install "
                "monai_wsl without -e (pip install PATH_TO/monai_wsl), or keep the clone out of the folder that holds "
                "the MONAI Label environment"
            )
        if not self.model_path.is_file():
            raise FileNotFoundError(
                f"model {self.model_path} does not exist: train the bundle first (python -m monai.bundle run "
                "--config_file bundle/configs/train.json) or pass --conf model PATH_TO/model.pt"
            )
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name=f"MONAI Label - monai_wsl {monai_wsl.__version__} (MONAI Label {monailabel.__version__})",
            description="Weakly-supervised histology localizer (max-min uncertainty) on images and whole slides",
            version=monai_wsl.__version__,
        )

    def init_infers(self) -> dict[str, InferTask]:
        slides = SlideRegionInferTask(self.bundle_root, self.model_path)
        task = ImagesAndSlidesInferTask(BundleImageInferTask(self.bundle_root, self.model_path, self.conf), slides)
        logger.info(f"+++ Adding Inferer:: {self.model_name} => {task} ({self.bundle_root}, {self.model_path})")
        log_synthetic_model_warning(self.model_path)
        return {self.model_name: task}

    def _known_image(self, request: dict[str, Any]) -> None:
        """An id that is neither a file nor in the studies folder is answered 400 naming it (MONAI Label would pass
        None on to the task)."""
        image = request.get("image")
        if isinstance(image, str) and not os.path.exists(image) and not self.datastore().get_image_uri(image):
            raise HTTPException(status_code=400, detail=unknown_image_message(image, self.studies))

    def infer(self, request: dict[str, Any], datastore: Any = None) -> dict[str, Any]:
        self._known_image(request)
        return super().infer(request, datastore)

    def infer_wsi(self, request: dict[str, Any], datastore: Any = None) -> dict[str, Any]:
        """MONAI Label's whole-slide inference, with the DSA document as the default reply (MONAI Label's own default
        is its JSON of tiles) and, at a level above 0, tiles that cover the whole region (MONAI Label 0.8.5 cuts the
        region in level-0 pixels but reads each tile at the level, which covers a part of it only)."""
        self._known_image(request)
        request = dict(request)
        request["output"] = request.get("output") or "dsa"
        level = request.get("level") or 0
        if not request.get("wsi_tiles") and isinstance(level, int) and level > 0:
            path = request["image"]
            if not os.path.exists(path):
                path = (datastore or self.datastore()).get_image_uri(path)
            try:
                region = check_region_request({**request, "image": path})
                tiles = region_tiles(region, request.get("tile_size") or region.size)
            except DataError as e:
                raise HTTPException(status_code=400, detail=str(e)) from e
            request["wsi_tiles"] = [{"location": list(t["location"]), "size": list(t["size"])} for t in tiles]
        return super().infer_wsi(request, datastore)

    def init_trainers(self) -> dict[str, TrainTask]:
        return {}  # image-level labels: train with the bundle, not MONAI Label's pixel-label trainers
