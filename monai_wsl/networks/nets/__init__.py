from __future__ import annotations

from .base import MaskOutput, WSLNet
from .cam import CAMClassifier, CAMNet, camnet, class_map_of
from .deepmil import DeepMIL, DeepMILNet, deepmilnet
from .encoders import (
    ENCODERS,
    EfficientNetLite0Encoder,
    EfficientNetLiteEncoder,
    ResNetEncoder,
    build_encoder,
    efficientnet_lite0_weights_path,
    efficientnet_lite_weights_path,
    load_encoder_weights,
)
from .maxmin import MaxMinNet, MaxMinUncertaintyNet, maxminnet
