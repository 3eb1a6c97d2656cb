from __future__ import annotations

from .blocks import CAMHead, WildcatHead, WildcatPool, wildcat_pool
from .config import RecordsConfig
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
from .utils import (
    CPUSyncBatchNorm,
    convert_sync_batchnorm,
    fold_same_padding,
    minmax_normalize,
    normalized_map,
    resize_by,
    set_padding_mode,
    soft_mask,
    unwrap,
    upsample,
)
