"""Every method of the comparison behind one name, so that runs differ only in ``--method``.

The bundle's ``network_def`` and ``loss_def`` call :func:`build_network` and :func:`build_loss`; the data, encoder,
recipe, metrics and threshold rule stay the same for all methods.

| method | network | training loss | its map |
|---|---|---|---|
| ``maxmin`` | :class:`MaxMinUncertaintyNet` | :class:`MaxMinUncertaintyLoss` (ablations: its switches) | mask M |
| ``cam`` | :class:`CAMClassifier`, average pooling | cross-entropy | CAM of the predicted class |
| ``cam_max`` | max pooling | cross-entropy | idem |
| ``cam_lse`` | log-sum-exp pooling | cross-entropy | idem |
| ``wildcat`` | WILDCAT pooling (WILDCAT alone) | cross-entropy | idem |
| ``gradcam`` | :class:`GradCAMClassifier` (a CAM classifier) | cross-entropy | Grad-CAM of the predicted class |
| ``gradcampp`` | idem | cross-entropy | Grad-CAM++ |
| ``deepmil`` | :class:`DeepMILNet` (gated attention MIL) | cross-entropy | attention weights |
"""

from __future__ import annotations

import inspect

import torch.nn as nn

from monai_wsl import networks
from monai_wsl.losses import MaxMinUncertaintyLoss, WSLCrossEntropyLoss
from monai_wsl.utils import as_bool

__all__ = ["METHODS", "build_network", "build_loss"]

#: method -> (network class name in monai_wsl.networks, the arguments the method fixes)
METHODS: dict[str, tuple[str, dict]] = {
    "maxmin": ("MaxMinUncertaintyNet", {}),
    "cam": ("CAMClassifier", {"pooling": "avg"}),
    "cam_max": ("CAMClassifier", {"pooling": "max"}),
    "cam_lse": ("CAMClassifier", {"pooling": "lse"}),
    "wildcat": ("CAMClassifier", {"pooling": "wildcat"}),
    "gradcam": ("GradCAMClassifier", {"pooling": "avg", "cam_method": "gradcam"}),
    "gradcampp": ("GradCAMClassifier", {"pooling": "avg", "cam_method": "gradcampp"}),
    "deepmil": ("DeepMILNet", {}),
}


def _network_class(method: str) -> type[nn.Module]:
    if method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}.")
    return getattr(networks, METHODS[method][0])


def _parameters(cls: type) -> set[str]:
    return set(inspect.signature(cls.__init__).parameters) - {"self", "args", "kwargs"}


def build_network(method: str = "maxmin", **kwargs) -> nn.Module:
    """The network of ``method``, built from the arguments it takes among ``kwargs``.

    One config can thus list the union of all methods' settings (the max-min ``sigma`` and ``w``, WILDCAT's
    ``kmax``, ...): each method takes its own and ignores the others. An argument that no method takes is an error
    (a typo), and so is one that contradicts what the method fixes (``pooling`` for ``cam``).
    """
    cls = _network_class(method)
    known = set().union(*(_parameters(_network_class(m)) for m in METHODS))
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ValueError(f"unknown network arguments {unknown}; the methods take {sorted(known)}.")
    fixed = METHODS[method][1]
    clash = {k: kwargs[k] for k in fixed if k in kwargs and kwargs[k] != fixed[k]}
    if clash:
        raise ValueError(f"method {method!r} fixes {fixed}; got {clash}: choose another method instead.")
    own = _parameters(cls)
    return cls(**{k: v for k, v in kwargs.items() if k in own}, **fixed)


def build_loss(
    method: str = "maxmin",
    lambda_bg: float = 1e-7,
    bg_term: str | None = "sem",
    size_constraint: bool = True,
    t: float = 5.0,
) -> nn.Module:
    """:class:`MaxMinUncertaintyLoss` with these switches for ``maxmin``; plain cross-entropy on the logits for the
    baselines (which ignore the switches). ``size_constraint`` may come from the command line as ``"false"``."""
    _network_class(method)
    if method == "maxmin":
        switch = as_bool(size_constraint)
        return MaxMinUncertaintyLoss(lambda_bg=float(lambda_bg), bg_term=bg_term, size_constraint=switch, t=t)
    return WSLCrossEntropyLoss()
