"""Small helpers the bundle configs call."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["default_bundle_root", "list_images", "report_outputs", "write_json_atomic", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".nii", ".nii.gz")


def default_bundle_root() -> str:
    """``"."`` when run from inside the bundle folder (``configs/metadata.json`` there), ``"bundle"`` when run from
    the repository root (``python -m monai.bundle run --config_file bundle/configs/train.json``), so that models and
    logs land in the bundle either way. Pass ``--bundle_root`` to choose."""
    if Path("configs/metadata.json").is_file():
        return "."
    if Path("bundle/configs/metadata.json").is_file():
        return "bundle"
    return "."


def list_images(folder: str | Path, exclude_masks: bool = True) -> list[dict[str, str]]:
    """``[{"image": path}, ...]`` for every image file in ``folder`` (sorted; GlaS ``*_anno`` masks left out), for
    inference. Raises ``ValueError`` when there is none, or when two share a name but for the extension (their outputs
    would overwrite each other)."""
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"{root} is not a folder: inference reads a folder of images (--dataset_dir FOLDER).")
    found = [
        p
        for p in sorted(root.iterdir())
        if p.is_file()
        and p.name.lower().endswith(IMAGE_SUFFIXES)
        and not (exclude_masks and p.name.split(".")[0].endswith("_anno"))
    ]
    if not found:
        raise ValueError(f"no image ({', '.join(IMAGE_SUFFIXES)}) in {root}.")
    stems: dict[str, Path] = {}
    for p in found:
        stem = p.name.split(".")[0]
        if stem in stems:
            raise ValueError(
                f"{stems[stem]} and {p} would both be written as {stem}_mask: rename one of them or move it to "
                "another folder."
            )
        stems[stem] = p
    return [{"image": str(p)} for p in found]


def report_outputs(folder: str | Path, what: str) -> None:
    """Say where a run's files went: the folder, and what it holds by kind (``*_mask.png (18)``)."""
    folder = Path(folder).resolve()
    kinds: dict[str, int] = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            name = p.name if "_" not in p.stem else "*" + p.name[p.name.rfind("_") :]
            key = name if p.parent == folder else f"{p.parent.relative_to(folder)}/{name}"
            kinds[key] = kinds.get(key, 0) + 1
    listing = ", ".join(f"{k} ({n})" for k, n in kinds.items())
    logging.getLogger("monai_wsl").info(f"{what}: the results are in {folder}, which holds {listing}")


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write JSON to a temporary file beside ``path``, then rename it: ``path`` is never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
