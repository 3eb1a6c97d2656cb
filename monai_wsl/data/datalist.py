"""From whatever the user points ``dataset_dir`` at to a MONAI datalist."""

from __future__ import annotations

import json
from pathlib import Path

from monai_wsl.data.glas import create_glas_datalist
from monai_wsl.data.synthetic import write_synthetic_histology

__all__ = ["prepare_datalist", "load_datalist", "datalist_split", "SPLITS"]

SPLITS = ("training", "validation", "test")


def load_datalist(path: str | Path) -> dict:
    """Read a MONAI datalist JSON (``{"training": [...], "validation": [...], "test": [...]}``); relative
    ``image`` / ``mask`` paths are resolved against the JSON file's folder, and every file is checked to exist."""
    path = Path(path)
    try:
        datalist = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"could not read the datalist {path}: {e}") from e
    if not isinstance(datalist, dict) or not any(isinstance(datalist.get(s), list) for s in SPLITS):
        raise ValueError(f"datalist {path} must be a JSON object with a 'training', 'validation' or 'test' list.")
    datalist.setdefault("source", str(path))
    for split in SPLITS:
        for i, item in enumerate(datalist.get(split) or []):
            if not isinstance(item, dict) or "image" not in item:
                raise ValueError(
                    f"datalist {path}: {split}[{i}] must be an object with an 'image' entry, got {item!r}."
                )
            for key in ("image", "mask"):
                if key in item:
                    file = Path(item[key]) if Path(item[key]).is_absolute() else path.parent / item[key]
                    if not file.is_file():
                        raise ValueError(f"datalist {path}: {split}[{i}] {key} file {file} does not exist.")
                    item[key] = str(file)
    return datalist


def prepare_datalist(
    dataset_dir: str | Path | None, synthetic_dir: str | Path = "./data/synthetic", synthetic: dict | None = None
) -> dict:
    """The datalist the bundle trains on.

    - ``None`` or ``""``: the embedded synthetic histology-like set, written once to ``synthetic_dir``
      (:func:`~monai_wsl.data.synthetic.write_synthetic_histology` with the arguments in ``synthetic``).
    - a ``.json`` file, or a folder holding ``datalist.json``: a MONAI datalist (:func:`load_datalist`).
    - a folder with ``Grade.csv``: a GlaS release (:func:`~monai_wsl.data.glas.create_glas_datalist`; its
      ``splits/`` fold 0 files when present).
    """
    if dataset_dir is None or str(dataset_dir).strip() == "":
        return load_datalist(write_synthetic_histology(synthetic_dir, **(synthetic or {})))
    path = Path(dataset_dir).expanduser()
    if path.is_file() and path.suffix == ".json":
        return load_datalist(path)
    if path.is_dir() and (path / "datalist.json").is_file():
        return load_datalist(path / "datalist.json")
    if path.is_dir() and (path / "Grade.csv").is_file():
        return {"source": str(path), **create_glas_datalist(path)}
    if not path.exists():
        raise ValueError(f"dataset_dir {path} does not exist.")
    raise ValueError(
        f"dataset_dir {path} is neither a datalist JSON, a folder with datalist.json, nor a GlaS folder with "
        "Grade.csv: write a MONAI datalist ({'training': [{'image', 'label', 'mask'}], 'validation': [...]}) or run "
        "scripts/prepare_glas.py."
    )


def datalist_split(datalist: dict, split: str) -> list[dict]:
    """``datalist[split]``, or a ``ValueError`` when that split is missing or empty."""
    items = datalist.get(split)
    if not items:
        source = datalist.get("source", "the datalist")
        raise ValueError(
            f"the {split!r} split of {source} is empty: a MONAI datalist needs image entries under {split!r} "
            f"(it has {sorted(k for k in datalist if isinstance(datalist[k], list))})."
        )
    return items
