"""Dictionary transforms for GlaS-like data: run them after ``LoadImaged(keys=["image", "mask"])`` and
``EnsureChannelFirstd``, so that arrays are channel-first ``(C, spatial_dim_0[, ...])`` (``(C, W, H)`` for a
PNG/BMP/JPG read by MONAI's PILReader). Errors name the file (``x.meta["filename_or_obj"]`` or the
``<key>_meta_dict``).

Example::

    Compose([
        LoadImaged(keys=["image", "mask"]),
        EnsureChannelFirstd(keys=["image", "mask"]),
        EnsureRGBd(keys="image"),
        BinarizeMaskd(keys="mask"),
        CheckSameSized(keys=["image", "mask"]),
        CheckLabeld(keys="label", num_classes=2, class_names=["benign", "malignant"]),
    ])
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform
from monai.utils import PostFix

from .array import BinarizeMask, EnsureRGB, filename_of

__all__ = [
    "EnsureRGBd",
    "EnsureRGBD",
    "EnsureRGBDict",
    "BinarizeMaskd",
    "BinarizeMaskD",
    "BinarizeMaskDict",
    "CheckSameSized",
    "CheckSameSizeD",
    "CheckSameSizeDict",
    "CheckLabeld",
    "CheckLabelD",
    "CheckLabelDict",
    "EmptyMaskd",
    "EmptyMaskD",
    "EmptyMaskDict",
]


def _filename(d: Mapping, key: Hashable) -> str:
    """File behind ``d[key]``: from its MetaTensor meta, a path string, or ``d["<key>_meta_dict"]``."""
    meta = d.get(PostFix.meta(str(key))) or {}
    default = str(meta["filename_or_obj"]) if meta.get("filename_or_obj") else "(no file name in meta)"
    return filename_of(d.get(key), default) or default


def _show(value: object) -> str:
    return repr(value.tolist()) if isinstance(value, (torch.Tensor, np.ndarray)) else repr(value)


class EnsureRGBd(MapTransform):
    """Dictionary-based :py:class:`monai_wsl.transforms.EnsureRGB`: make images 3-channel RGB in ``[0, 255]``.

    Grey (1 channel), grey + alpha (2), RGBA (4) and 16-bit images are converted with ``mode="convert"`` (default,
    a warning logged once per file) and raise a ``ValueError`` naming the file with ``mode="error"``.

    Shapes: ``(C, spatial_dim_0[, ...])`` -> ``(3, spatial_dim_0[, ...])``.

    Args:
        keys: keys of the images.
        mode: ``"convert"`` or ``"error"``.
        allow_missing_keys: don't raise if a key is missing.
    """

    backend = EnsureRGB.backend

    def __init__(self, keys: KeysCollection = "image", mode: str = "convert", allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.converter = EnsureRGB(mode=mode, fix_hint=f"EnsureRGBd(keys={keys!r}, mode='convert')")

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.converter(d[key], filename=_filename(d, key))
        return d


class BinarizeMaskd(MapTransform):
    """Dictionary-based :py:class:`monai_wsl.transforms.BinarizeMask`: any mask value ``> 0`` becomes 1.

    Instance-id masks (official GlaS ``*_anno.bmp``), 0/255 masks and RGB-saved masks all give a float32
    ``{0, 1}`` mask with one channel.

    Shapes: ``(C, spatial_dim_0[, ...])`` -> ``(1, spatial_dim_0[, ...])``.

    Args:
        keys: keys of the masks.
        ignore_alpha: ignore the last channel of 2- and 4-channel masks (alpha).
        allow_missing_keys: don't raise if a key is missing (e.g. training items without a mask).
    """

    backend = BinarizeMask.backend

    def __init__(self, keys: KeysCollection = "mask", ignore_alpha: bool = True, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.binarizer = BinarizeMask(ignore_alpha=ignore_alpha)

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.binarizer(d[key])
        return d


class CheckSameSized(MapTransform):
    """Raise a ``ValueError`` naming both files and sizes when the arrays of ``keys`` differ in spatial size.

    Compares ``shape[1:]`` of channel-first arrays ``(C, spatial_dim_0[, ...])`` with that of the first key;
    the data pass unchanged.

    Args:
        keys: keys to compare, e.g. ``("image", "mask")``.
        allow_missing_keys: skip missing keys.
    """

    def __init__(self, keys: KeysCollection = ("image", "mask"), allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, object]) -> Mapping[Hashable, object]:
        ref_key, ref_size = None, None
        for key in self.key_iterator(data):
            size = tuple(int(s) for s in data[key].shape[1:])
            if ref_key is None:
                ref_key, ref_size = key, size
            elif size != ref_size:
                raise ValueError(
                    f"{ref_key} {_filename(data, ref_key)} has spatial size {ref_size} but {key} "
                    f"{_filename(data, key)} has {size}: they must match pixel for pixel; fix or re-export the file."
                )
        return data


class CheckLabeld(MapTransform):
    """Raise a ``ValueError`` naming the image file when a label is not a class index in ``[0, num_classes)``.

    A label is an ``int`` (or numpy integer) or a 0-d / 1-element integer tensor or array; the data pass unchanged.

    Args:
        keys: keys of the labels.
        num_classes: number of classes.
        class_names: optional names of the classes, shown in messages; must have ``num_classes`` entries.
        image_key: key whose file name identifies the sample in messages.
        allow_missing_keys: skip missing keys.
    """

    def __init__(
        self,
        keys: KeysCollection = "label",
        num_classes: int = 2,
        class_names: Sequence[str] | None = None,
        image_key: str = "image",
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}.")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names {list(class_names)} must have num_classes={num_classes} entries.")
        self.num_classes = num_classes
        self.class_names = list(class_names) if class_names is not None else None
        self.image_key = image_key

    @staticmethod
    def _as_index(label: object) -> int | None:
        """The class index held by ``label``, or ``None`` when it is not a single integer."""
        if isinstance(label, torch.Tensor):
            integer = not (label.dtype == torch.bool or label.dtype.is_floating_point or label.dtype.is_complex)
            return int(label.reshape(()).item()) if integer and label.numel() == 1 else None
        if isinstance(label, np.ndarray):
            return int(label.reshape(())) if label.dtype.kind in "iu" and label.size == 1 else None
        if isinstance(label, (int, np.integer)) and not isinstance(label, bool):
            return int(label)
        return None

    def __call__(self, data: Mapping[Hashable, object]) -> Mapping[Hashable, object]:
        for key in self.key_iterator(data):
            index = self._as_index(data[key])
            if index is not None and 0 <= index < self.num_classes:
                continue
            classes = f"[0, {self.num_classes})"
            if self.class_names:
                classes += " (" + ", ".join(f"{i}={c}" for i, c in enumerate(self.class_names)) + ")"
            raise ValueError(
                f"{key} {_show(data[key])} of image {_filename(data, self.image_key)} is not a class index in "
                f"{classes}: fix its label in the datalist (an int, e.g. from Grade.csv via create_glas_datalist)."
            )
        return data


EnsureRGBD = EnsureRGBDict = EnsureRGBd
BinarizeMaskD = BinarizeMaskDict = BinarizeMaskd
CheckSameSizeD = CheckSameSizeDict = CheckSameSized
CheckLabelD = CheckLabelDict = CheckLabeld


class EmptyMaskd(MapTransform):
    """Give an item without a mask an all-zero mask of its image's spatial size: the convention of datalists whose
    images may lack a mask file because they have no foreground (CAMELYON16 normal patches; the datalist says
    ``"missing_mask": "empty"`` and the pre-flight check lets only such datalists through). Items with a mask pass
    unchanged.

    Shapes: image ``(C, spatial_dim_0[, ...])`` -> mask ``(1, spatial_dim_0[, ...])`` float32 zeros, a MetaTensor
    carrying the image's meta data (its affine and file name, for savers and messages).

    Args:
        keys: keys of the masks.
        image_key: the image whose size the mask takes.
    """

    def __init__(self, keys: KeysCollection = "mask", image_key: str = "image") -> None:
        super().__init__(keys, allow_missing_keys=True)
        self.image_key = image_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        from monai.data import MetaTensor

        d = dict(data)
        for key in self.keys:
            if key in d:
                continue
            image = d[self.image_key]
            zeros = torch.zeros((1, *image.shape[1:]), dtype=torch.float32)
            meta = dict(image.meta) if isinstance(image, MetaTensor) else {}
            d[key] = MetaTensor(zeros, meta=meta) if meta else zeros
        return d


EmptyMaskD = EmptyMaskDict = EmptyMaskd
