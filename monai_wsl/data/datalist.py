"""Read one split of a MONAI datalist, with errors that name the file."""

from __future__ import annotations

import json
from pathlib import Path

from monai.data import load_decathlon_datalist

__all__ = ["load_datalist", "missing_mask_is_empty"]


def load_datalist(path: str | Path, split: str = "training", check_files: bool = True) -> list[dict]:
    """The ``split`` list of a MONAI datalist JSON (``{"training": [{"image", "label", "mask"?}, ...],
    "validation": [...], "test": [...]}``), read by ``monai.data.load_decathlon_datalist``: relative paths are
    resolved against the JSON file's folder.

    Raises:
        ValueError: naming the file, when it is missing or not JSON, when the split is missing or empty, or (with
            ``check_files``) when an item lacks an image or names an image or mask file that does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(
            f"datalist {path} not found: write one with scripts/prepare_glas.py (GlaS) or by hand "
            "({'training': [{'image', 'label', 'mask'}], 'validation': [...]}), and pass its folder as --dataset_dir."
        )
    try:
        items = load_decathlon_datalist(path, is_segmentation=False, data_list_key=split)
    except (ValueError, TypeError, json.JSONDecodeError) as e:
        raise ValueError(f"could not read the {split!r} split of the datalist {path}: {e}") from e
    if not items:
        raise ValueError(
            f"the {split!r} split of {path} is empty: a MONAI datalist needs image entries under {split!r}."
        )
    for i, item in enumerate(items if check_files else ()):
        if "image" not in item:
            raise ValueError(f"datalist {path}: {split}[{i}] must have an 'image' entry, got {item!r}.")
        for key in ("image", "mask"):
            if key in item and not (isinstance(item[key], str) and Path(item[key]).is_file()):
                raise ValueError(
                    f"datalist {path}: {split}[{i}] {key} file {item[key]} does not exist (relative paths are read "
                    f"from {path.parent})."
                )
    return items


def missing_mask_is_empty(path: str | Path) -> bool:
    """Whether the datalist says that an item without a ``"mask"`` has an all-zero mask (its top-level
    ``"missing_mask": "empty"``, as ``scripts/prepare_camelyon16.py`` writes for the normal patches, which have no
    mask file). Otherwise (the default) a scored item without a mask is an error. False for an unreadable file (the
    pre-flight check reports it)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("missing_mask") == "empty"
