"""Conversions of a built network that leave its weights as they are: out of a DDP wrapper, batch norm synchronised
across processes (on CPUs too), and the padding of its convolutions (TensorFlow's "same" folded into the
convolutions, or another padding mode)."""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.distributed.nn as dist_nn
from monai.utils import str2bool
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "unwrap",
    "CPUSyncBatchNorm",
    "convert_sync_batchnorm",
    "fold_same_padding",
    "place_network",
    "set_padding_mode",
]


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


def place_network(
    module: torch.nn.Module,
    device: str | torch.device,
    fold_padding: bool | str = "auto",
    memory_format: torch.memory_format | str = "auto",
) -> torch.nn.Module:
    """``module`` on ``device`` in the layout that trains fastest there, the bundle's ``network``: ``"auto"`` folds the
    padding (:func:`fold_same_padding`) and puts a 2D network in channels-last on a CPU, and leaves the network as
    built on other devices and for volumes (channels-last is a layout of 4D tensors). ``fold_padding`` (a bool or
    "true" / "false") and ``memory_format`` (a ``torch.memory_format``) set either one instead. The same function
    either way; a fixed-seed training in one layout does not repeat one in the other bit for bit."""
    device = torch.device(device)
    on_cpu = device.type == "cpu"
    if isinstance(fold_padding, str) and fold_padding.lower() == "auto":
        fold_padding = on_cpu
    if isinstance(memory_format, str):
        if memory_format.lower() != "auto":
            raise ValueError(f"memory_format must be a torch.memory_format or 'auto', got {memory_format!r}")
        ranks = {m.weight.ndim for m in module.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)}
        memory_format = torch.channels_last if on_cpu and ranks == {4} else torch.contiguous_format
    return fold_same_padding(module, fold_padding).to(device, memory_format=memory_format)


def fold_same_padding(module: torch.nn.Module, enabled: bool | str = True) -> torch.nn.Module:
    """Fold the "same" padding of MONAI's EfficientNet into its convolutions, in place; returns ``module``.

    MONAI's EfficientNet pads every convolution ``<name>`` with a separate zero ``ConstantPad`` module
    ``<name>_padding`` (TensorFlow's "same" padding). Where that padding is equal on every side (the stride-1
    convolutions), the convolution can pad by itself: the same function, the same weights and state dict, and no copy
    of each activation and its gradient. On 2 CPU cores it makes a max-min training step about 10 % faster.
    The forward pass is unchanged to the bit; the backward pass sums in another order (gradients differ by about
    1e-6), so a fixed-seed training does not repeat an unfolded one bit for bit: hence off in the bundle unless
    ``--fold_padding true`` (or ``auto``: on CPUs, :func:`place_network`).
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
