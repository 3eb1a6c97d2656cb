"""Small helpers the bundle configs call."""

from __future__ import annotations

from pathlib import Path

import torch.distributed as dist

__all__ = ["as_bool", "default_bundle_root", "is_main_process", "list_images", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".nii", ".nii.gz")


def as_bool(value: object) -> bool:
    """A command-line flag as a bool: ``python -m monai.bundle run --resume true`` passes the string ``"true"`` (only
    ``True`` / ``False`` reach the config as bools), and ``"false"`` must not count as true."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("true", "1", "yes", "y", "on"):
            return True
        if text in ("false", "0", "no", "n", "off", "", "none", "null"):
            return False
        raise ValueError(f"expected a yes/no value (true / false), got {value!r}.")
    return bool(value)


def default_bundle_root() -> str:
    """``"."`` when run from inside the bundle folder (``configs/metadata.json`` there), ``"bundle"`` when run from
    the repository root (``python -m monai.bundle run --config_file bundle/configs/train.json``), so that models and
    logs land in the bundle either way. Pass ``--bundle_root`` to choose."""
    if Path("configs/metadata.json").is_file():
        return "."
    if Path("bundle/configs/metadata.json").is_file():
        return "bundle"
    return "."


def is_main_process() -> bool:
    """True outside distributed runs and on rank 0: the process that logs and writes files."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def list_images(folder: str | Path, exclude_masks: bool = True) -> list[dict[str, str]]:
    """``[{"image": path}, ...]`` for every image file in ``folder`` (sorted; GlaS ``*_anno`` masks left out), for
    inference. Raises ``ValueError`` when there is none."""
    root = Path(folder)
    if root.is_file():
        return [{"image": str(root)}]
    if not root.is_dir():
        raise ValueError(f"{root} is not a folder of images (or an image file).")
    found = [
        p
        for p in sorted(root.iterdir())
        if p.is_file()
        and p.name.lower().endswith(IMAGE_SUFFIXES)
        and not (exclude_masks and p.name.split(".")[0].endswith("_anno"))
    ]
    if not found:
        raise ValueError(f"no image ({', '.join(IMAGE_SUFFIXES)}) in {root}.")
    return [{"image": str(p)} for p in found]
