from __future__ import annotations

from .barrier import ExtendedLogBarrier, extended_log_barrier
from .classification import WSLCrossEntropyLoss
from .maxmin import MaxMinLoss, MaxMinUncertaintyLoss, as_class_labels
from .uniformity import UniformityLoss, uniformity
