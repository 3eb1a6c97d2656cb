from __future__ import annotations

from .checkpoint import ResumableCheckpointSaver, ResumeCheckpointLoader, latest_checkpoint
from .images import OverlaySaver, TensorBoardOverlayHandler
from .loss_terms import LossTermsHandler
from .metrics import PixelAP
from .schedules import EpochSeedHandler, ScheduleHandler
