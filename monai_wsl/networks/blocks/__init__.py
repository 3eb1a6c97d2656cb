from __future__ import annotations

from .cam_head import POOLINGS, CAMHead, global_pool
from .wildcat import WildcatHead, WildcatPool, num_selected, wildcat_pool
