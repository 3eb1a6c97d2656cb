from __future__ import annotations

from .checkpoint import (
    AtomicDiskSaver,
    CheckedCheckpointLoader,
    NonFiniteError,
    ResumableCheckpointSaver,
    ResumeCheckpointLoader,
    describe_state_dict,
    latest_checkpoints,
)
from .finite import StopOnNonFinite
from .images import OverlaySaver, TensorBoardOverlayHandler
from .loss_terms import LossTermsHandler
from .metrics import PixelAP
from .per_image import PerImageCSVWriter
from .schedules import EpochSeedHandler, ScheduleHandler
from .summary import MODEL_CARD, TrainingSummary, read_model_card, trained_setting
