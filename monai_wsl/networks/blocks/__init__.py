from __future__ import annotations

from .cam_head import POOLINGS, CAMHead, global_pool
from .soft_mask import soft_mask
from .wildcat import WildcatHead, WildcatPool, num_selected, wildcat_pool
