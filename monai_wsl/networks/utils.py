"""From class maps to masks: the one place where maps are upsampled, normalised and turned into soft masks.

Training, evaluation, inference, MONAI Label and the CAM baselines all go through these functions.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.distributed.nn as dist_nn
import torch.nn.functional as F
from monai.utils import str2bool
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "upsample",
    "minmax_normalize",
    "normalized_map",
    "soft_mask",
    "fold_same_padding",
    "set_padding_mode",
    "resize_by",
    "as_plain_tensor",
    "spatial_flips",
    "unwrap",
    "CPUSyncBatchNorm",
    "convert_sync_batchnorm",
]

_INTERP = {1: "linear", 2: "bilinear", 3: "trilinear"}


def as_plain_tensor(x: torch.Tensor) -> torch.Tensor:
    """``x`` without MONAI's meta data (a ``MetaTensor`` viewed as a plain tensor; anything else unchanged)."""
    return x.as_tensor() if hasattr(x, "as_tensor") else x


def upsample(maps: torch.Tensor, spatial_size: Sequence[int]) -> torch.Tensor:
    """(Bi/tri)linear resize of ``(B, C, *spatial)`` maps to ``spatial_size``."""
    size = tuple(int(s) for s in spatial_size)
    if tuple(maps.shape[2:]) == size:
        return maps
    return F.interpolate(maps, size=size, mode=_INTERP[maps.ndim - 2], align_corners=False)


def spatial_flips(spatial_dims: int) -> list[tuple[int, ...]]:
    """Every combination of flips of the spatial axes of ``(B, C, *spatial)`` tensors, as ``flip`` dims (identity
    ``()`` first): 4 in 2D, 8 in 3D."""
    combos: list[tuple[int, ...]] = [()]
    for axis in range(2, 2 + spatial_dims):
        combos += [c + (axis,) for c in combos]
    return combos


def resize_by(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Resize ``(B, C, *spatial)`` images by ``scale`` (each side at least one pixel); ``scale == 1`` is a no-op."""
    if scale == 1:
        return x
    return upsample(x, [max(1, int(s * scale)) for s in x.shape[2:]])


def minmax_normalize(maps: torch.Tensor, eps: float = 1e-8, per_image: bool = True) -> torch.Tensor:
    """Min-max normalise each map of ``(B, C, *spatial)`` to [0, 1], per image and channel (``per_image=False``:
    one minimum and maximum per channel over the whole batch, as the authors' training code does).

    A constant map (max == min) becomes all zeros instead of dividing by zero.
    """
    flat = maps.flatten(2) if per_image else maps.transpose(0, 1).flatten(1)[None]
    lo = flat.amin(-1).view(*flat.shape[:2], *([1] * (maps.ndim - 2)))
    hi = flat.amax(-1).view_as(lo)
    return (maps - lo) / (hi - lo).clamp_min(eps)


def normalized_map(maps: torch.Tensor, spatial_size: Sequence[int], per_image: bool = True) -> torch.Tensor:
    """Upsample ``(B, C, h, w)`` maps to ``spatial_size`` and min-max normalise each per image (or over the batch):
    values in [0, 1]."""
    return minmax_normalize(upsample(maps, spatial_size), per_image=per_image)


def soft_mask(
    class_maps: torch.Tensor,
    scores: torch.Tensor,
    spatial_size: Sequence[int],
    sigma: float | torch.Tensor = 0.15,
    w: float = 5.0,
    per_image: bool = True,
) -> torch.Tensor:
    """The max-min soft mask ``M = sigmoid(w * (A_norm - sigma))``.

    ``A+ = sum_k softmax(scores)_k * A_k`` (a probability-weighted mix of every class map, nothing detached) is
    upsampled to ``spatial_size`` and min-max normalised per image (``A_norm``). ``M >= 0.5`` exactly where
    ``A_norm >= sigma``.

    Args:
        class_maps: ``(B, K, *spatial_low)`` localizer class maps.
        scores: ``(B, K)`` localizer class scores.
        spatial_size: the input image's spatial size.
        sigma: threshold, in [0, 1] of the normalised map.
        w: slope of the sigmoid.
        per_image: min-max normalise each image's map (the paper); ``False``: over the whole batch.

    Returns:
        ``(B, 1, *spatial_size)`` mask in (0, 1).
    """
    if class_maps.shape[:2] != scores.shape:
        raise ValueError(
            f"class_maps (B, K, ...) and scores (B, K) disagree: {tuple(class_maps.shape)} vs {tuple(scores.shape)}."
        )
    probs = scores.softmax(1).view(*scores.shape, *([1] * (class_maps.ndim - 2)))
    mixed = (probs * class_maps).sum(1, keepdim=True)
    return torch.sigmoid(w * (normalized_map(mixed, spatial_size, per_image) - sigma))


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DDP / DataParallel wrapper (any other module unchanged)."""
    parallel = (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)
    return module.module if isinstance(module, parallel) else module


_SYNC_GROUPS: dict = {}


def _sync_group():
    """A process group of its own for the batch statistics, created on first use (by every rank at the same point):
    their all-reduces in the backward pass must not interleave with DDP's gradient all-reduces, which gloo matches
    by order."""
    key = id(dist.group.WORLD)
    if key not in _SYNC_GROUPS:
        _SYNC_GROUPS[key] = dist.new_group(backend="gloo")
    return _SYNC_GROUPS[key]


class CPUSyncBatchNorm(_BatchNorm):
    """Batch normalisation whose training statistics are those of every process's images together, on CPUs
    (``gloo``), where PyTorch's ``SyncBatchNorm`` does not run: a distributed run then normalises as one process with
    the whole batch does. The sums are all-reduced in float64 with the differentiable
    ``torch.distributed.nn.all_reduce``, which also sums their gradients. Outside distributed training it is a plain
    BatchNorm. Any number of spatial dimensions."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.ndim < 2:
            raise ValueError(f"expected (B, C, *spatial) input, got shape {tuple(input.shape)}.")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if not (self.training and distributed):
            return super().forward(input)
        dims, channels = [0, *range(2, input.ndim)], input.shape[1]
        wide = input.double()  # E[x^2] - E[x]^2 cancels badly in float32 for channels with a large mean
        local = torch.cat([wide.sum(dims), wide.pow(2).sum(dims), wide.new_full((1,), input.numel() / channels)])
        with warnings.catch_warnings():  # the differentiable all_reduce is marked deprecated, without a successor yet
            warnings.filterwarnings("ignore", message=".*all_reduce is deprecated", category=UserWarning)
            stats = dist_nn.all_reduce(local, group=_sync_group())
        count = stats[-1]
        mean = stats[:channels] / count
        var = stats[channels : 2 * channels] / count - mean.pow(2)
        shape = (1, channels, *([1] * (input.ndim - 2)))
        out = (input - mean.view(shape).to(input.dtype)) * torch.rsqrt(var.view(shape) + self.eps).to(input.dtype)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(m * mean.to(self.running_mean.dtype))
                unbiased = var * count / (count - 1)
                self.running_var.mul_(1 - m).add_(m * unbiased.to(self.running_var.dtype))
        return out


def convert_sync_batchnorm(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` with every BatchNorm synchronised across processes, in place (same parameters, buffers and state dict
    keys); returns it, for multi-process training. With CUDA: PyTorch's ``SyncBatchNorm``; on CPUs:
    :class:`CPUSyncBatchNorm`."""
    if torch.cuda.is_available():
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for m in module.modules():
        if isinstance(m, _BatchNorm) and not isinstance(m, torch.nn.SyncBatchNorm):
            m.__class__ = CPUSyncBatchNorm  # the same object and tensors, with the synchronising forward
    return module


def fold_same_padding(module: torch.nn.Module, enabled: bool | str = True) -> torch.nn.Module:
    """Fold the "same" padding of MONAI's EfficientNet into its convolutions, in place; returns ``module``.

    MONAI's EfficientNet pads every convolution ``<name>`` with a separate zero ``ConstantPad`` module
    ``<name>_padding`` (TensorFlow's "same" padding). Where that padding is equal on every side (the stride-1
    convolutions), the convolution can pad by itself: the same function, the same weights and state dict, and no copy
    of each activation and its gradient. On 2 CPU cores it makes a max-min training step about 10 % faster.
    The forward pass is unchanged to the bit; the backward pass sums in another order (gradients differ by about
    1e-6), so a fixed-seed training does not repeat an unfolded one bit for bit: hence off in the bundle unless
    ``--fold_padding true``.
    """
    if not str2bool(enabled):
        return module
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if not name.endswith("_padding") or not isinstance(child, (torch.nn.ConstantPad2d, torch.nn.ConstantPad3d)):
                continue
            conv = getattr(parent, name[: -len("_padding")], None)
            pads = tuple(child.padding)
            if not isinstance(conv, (torch.nn.Conv2d, torch.nn.Conv3d)) or child.value != 0 or len(set(pads)) != 1:
                continue
            if any(s != 1 for s in conv.stride) or any(p != 0 for p in conv.padding):
                continue
            conv.padding = (pads[0],) * len(conv.kernel_size)
            setattr(parent, name, torch.nn.Identity())
    return module


_PADS = {"replicate": {2: torch.nn.ReplicationPad2d, 3: torch.nn.ReplicationPad3d}}
_CONVS = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


def set_padding_mode(module: torch.nn.Module, mode: str = "zeros") -> torch.nn.Module:
    """Pad the images' borders by repeating their edge instead of with zeros, in place; returns ``module``.

    ``"replicate"`` swaps every zero ``ConstantPad`` module (MONAI's EfficientNet pads each convolution with one,
    ``<name>_padding``) for a ``ReplicationPad`` of the same sizes, and makes the convolutions that pad by themselves
    (ResNets) replicate too. ``"zeros"`` leaves the network as it is (it does not undo an earlier ``"replicate"``).
    The weights and the state dict are unchanged (the same checkpoint loads either way), but the function is not: a
    network is run with the padding it was trained with. Reflection is not offered: MONAI's "same" padding is fixed
    when the network is built (2 pixels a side for the 5 x 5 convolutions), and a reflection needs more pixels than
    it pads, which small inputs do not have at the coarsest resolutions."""
    if mode == "zeros":
        return module
    if mode not in _PADS:
        raise ValueError(f"padding mode must be 'zeros' or 'replicate', got {mode!r}.")
    changed = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, (torch.nn.ConstantPad2d, torch.nn.ConstantPad3d)) and child.value == 0:
                dims = 2 if isinstance(child, torch.nn.ConstantPad2d) else 3
                setattr(parent, name, _PADS[mode][dims](tuple(child.padding)))
                changed += 1
            elif isinstance(child, _CONVS) and child.padding_mode == "zeros" and child.padding != "valid":
                if isinstance(child.padding, str) or any(p > 0 for p in child.padding):
                    child.padding_mode = mode
                    changed += 1
    already = any(
        isinstance(m, (torch.nn.ReplicationPad2d, torch.nn.ReplicationPad3d))
        or (isinstance(m, _CONVS) and m.padding_mode == mode)
        for m in module.modules()
    )  # built with padding_mode="replicate" and asked again (the bundle's switch on such a network_def): nothing to do
    if not changed and not already:
        raise ValueError(
            f"{type(module).__name__} pads nowhere, so padding mode {mode!r} has nothing to change: it applies to "
            "encoders that pad their convolutions (EfficientNet, ResNet); keep padding_mode 'zeros' for this network."
        )
    if hasattr(module, "padding_mode") and not isinstance(module, _CONVS):
        module.padding_mode = mode
    return module
