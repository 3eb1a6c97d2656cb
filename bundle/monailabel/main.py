"""A MONAI Label app that serves the monai_wsl bundle's localizer on whole slides: QuPath or the Digital Slide Archive
ask MONAI Label's ``/infer/wsi_v2/wsl_histology_segmentation`` for a region of a slide and get the regions of the
localizer's mask back, as polygons in level-0 pixels (DSA JSON, ASAP XML or JSON).

    monailabel start_server --app bundle/monailabel --studies FOLDER_OF_SLIDES --conf bundle bundle \\
        --conf model bundle/models/model.pt

``--conf bundle`` is the bundle folder (default: the folder above this app), ``--conf model`` the trained model
(default: ``<bundle>/models/model.pt``), ``--conf name`` the model's name in MONAI Label (default
``wsl_histology_segmentation``). The task is :class:`monai_wsl.apps.monailabel.SlideRegionInferTask`; it builds its
``SlideInferer`` from the bundle's ``inference.json`` + ``inference_wsi.json``. There is no trainer: the model learns
from image-level labels, which MONAI Label's trainers do not give; train with the bundle
(``python -m monai.bundle run --config_file bundle/configs/train.json``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import monailabel
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.train import TrainTask

import monai_wsl
from monai_wsl.apps.monailabel import SlideRegionInferTask

logger = logging.getLogger(__name__)

DEFAULT_NAME = "wsl_histology_segmentation"


class WSLHistologyApp(MONAILabelApp):
    """The bundle's localizer as one MONAI Label model (``--conf name``) for slides and regions of slides."""

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
            description="Weakly-supervised histology localizer (max-min uncertainty) on whole slides",
            version=monai_wsl.__version__,
        )

    def init_infers(self) -> dict[str, InferTask]:
        task = SlideRegionInferTask(self.bundle_root, self.model_path)
        logger.info(f"+++ Adding Inferer:: {self.model_name} => {task} ({self.bundle_root}, {self.model_path})")
        return {self.model_name: task}

    def init_trainers(self) -> dict[str, TrainTask]:
        return {}  # image-level labels: train with the bundle, not MONAI Label's pixel-label trainers
