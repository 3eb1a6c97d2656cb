from __future__ import annotations

from .blocks import CAMHead, WildcatHead, WildcatPool, soft_mask, wildcat_pool
from .config import RecordsConfig
from .conversions import (
    CPUSyncBatchNorm,
    convert_sync_batchnorm,
    fold_same_padding,
    place_network,
    set_padding_mode,
    unwrap,
)
from .nets import (
    ENCODERS,
    CAMClassifier,
    DeepMILNet,
    MaskOutput,
    MaxMinUncertaintyNet,
    WSLNet,
    build_encoder,
    load_encoder_weights,
)
from .utils import minmax_normalize, normalized_map, resize_by, upsample
