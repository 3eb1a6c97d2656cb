from __future__ import annotations

from .inferer import WSLInferer
