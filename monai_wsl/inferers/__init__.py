from __future__ import annotations

from .inferer import CAM_METHODS, GradCAMInferer, WSLInferer
from .slide import SlideInferer, TissueWSISplitter, binary_entropy
