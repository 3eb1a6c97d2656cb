from __future__ import annotations

from .checkpoint import ResumableCheckpointSaver, attach_checkpointing, checkpoint_to_resume, latest_checkpoint
from .images import OverlaySaver, TensorBoardOverlayHandler
from .loss_terms import LossTermsHandler
from .metrics import ClassificationError, PixelAP, PixelF1, PixelFPR, PixelIoU
from .results import ResultsWriter
from .schedules import EpochSeedHandler, MaxMinScheduleHandler, unwrap
