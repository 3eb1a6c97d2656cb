from __future__ import annotations

from .synthetic import CLASS_NAMES, make_synthetic_histology, synthetic_histology_sample, write_synthetic_histology
