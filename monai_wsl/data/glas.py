"""GlaS (Warwick-QU gland segmentation) release folder -> MONAI datalist.

A GlaS folder as a user has it holds ``train_N``, ``testA_N`` and ``testB_N`` images (``.bmp`` in the official
release; ``.png``, ``.jpg``, ``.jpeg``, ``.tif`` and ``.tiff`` are read alike), their masks ``<name>_anno.<ext>``
(instance ids, 0 = background, or binary 0/255) and ``Grade.csv``, whose header and values start with a space::

    name,patient ID, grade (GlaS), grade (Sirinukunwattana et al. 2015)
    train_1,2, malignant, moderately differentiated

The image-level label is the GlaS grade (``benign`` -> 0, ``malignant`` -> 1). :func:`create_glas_datalist` returns
a datalist that ``monai.data.load_decathlon_datalist`` and ``Dataset`` read as is::

    {"training": [{"image": "/abs/train_2.bmp", "label": 0, "mask": "/abs/train_2_anno.bmp"}, ...],
     "validation": [...], "test": [...], "labels": ["benign", "malignant"]}

Data: Sirinukunwattana et al., "Gland segmentation in colon histology images: The GlaS challenge contest",
Medical Image Analysis 2017 (research use only).
"""

from __future__ import annotations

import csv
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

__all__ = [
    "GLAS_CLASS_NAMES",
    "IMAGE_EXTENSIONS",
    "DEFAULT_VALID_FRACTION",
    "find_glas_images",
    "read_glas_grades",
    "read_split_csv",
    "stratified_split",
    "create_glas_datalist",
]

logger = logging.getLogger(__name__)

GLAS_CLASS_NAMES = ("benign", "malignant")
IMAGE_EXTENSIONS = (".bmp", ".png", ".jpg", ".jpeg", ".tif", ".tiff")
DEFAULT_VALID_FRACTION = 18 / 85  # the published fold-0 split: 67 training / 18 validation images

_EXT = "|".join(e.lstrip(".") for e in IMAGE_EXTENSIONS)
_FILE_RE = re.compile(rf"^(?P<name>(?:train|testA|testB)_(?P<num>\d+))(?P<anno>_anno)?\.(?:{_EXT})$", re.IGNORECASE)
_ANY_EXT = "{" + _EXT.replace("|", ",") + "}"  # for messages: {bmp,png,...}


def _sort_key(name: str) -> tuple[str, int]:
    prefix, num = name.rsplit("_", 1)
    return prefix, int(num)


def find_glas_images(src: str | Path) -> dict[str, dict[str, Path | None]]:
    """Find the GlaS images of ``src`` and their masks.

    Returns:
        ``{name: {"image": Path, "mask": Path | None}}`` in natural order (``train_2`` before ``train_10``);
        paths are absolute. Other files (``Grade.csv``, ``splits/``, notes) are ignored.

    Raises:
        ValueError: ``src`` is not a folder, holds no GlaS image, or holds two files for the same image or mask.
    """
    src = Path(src).expanduser().resolve()
    if not src.is_dir():
        raise ValueError(f"GlaS folder {src} does not exist or is not a folder.")
    found: dict[str, dict[str, Path]] = {}
    for path in sorted(src.iterdir()):
        match = _FILE_RE.match(path.name)
        if match is None or not path.is_file():
            continue
        # the prefix is matched case-insensitively; keep the canonical spelling (testA, not TESTA)
        prefix = {"train": "train", "testa": "testA", "testb": "testB"}[match["name"].split("_")[0].lower()]
        name, kind = f"{prefix}_{int(match['num'])}", "mask" if match["anno"] else "image"
        entry = found.setdefault(name, {})
        if kind in entry:
            raise ValueError(
                f"two {kind} files for {name} in {src}: {entry[kind].name} and {path.name}; keep only one of them."
            )
        entry[kind] = path
    images = {n: {"image": e["image"], "mask": e.get("mask")} for n, e in found.items() if "image" in e}
    if not images:
        raise ValueError(f"no GlaS image (train_N|testA_N|testB_N.{_ANY_EXT}) in {src}.")
    return {n: images[n] for n in sorted(images, key=_sort_key)}


def read_glas_grades(csv_path: str | Path, class_names: Sequence[str] = GLAS_CLASS_NAMES) -> dict[str, int]:
    """Read the image-level labels of GlaS ``Grade.csv``: ``{name: index of its GlaS grade in class_names}``.

    Header and values are stripped (the official file has leading spaces); grades are matched case-insensitively.

    Raises:
        ValueError: the file is missing, lacks the ``name`` or ``grade (GlaS)`` column, names an image twice with
            different grades, or holds a grade that is not in ``class_names``.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise ValueError(
            f"{csv_path} not found: GlaS labels come from the release's Grade.csv (columns 'name, patient ID, "
            "grade (GlaS), grade (Sirinukunwattana et al. 2015)'); copy it next to the images."
        )
    allowed = {c.lower(): i for i, c in enumerate(class_names)}
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)  # (line number, stripped values) of the non-empty rows
        rows = [(reader.line_num, [v.strip() for v in row]) for row in reader if any(v.strip() for v in row)]
    header = [h.lower() for h in rows[0][1]] if rows else []
    if "name" not in header or "grade (glas)" not in header:
        raise ValueError(f"{csv_path} must have the columns 'name' and 'grade (GlaS)'; found {header}.")
    i_name, i_grade = header.index("name"), header.index("grade (glas)")
    grades: dict[str, int] = {}
    for line, row in rows[1:]:
        if len(row) <= max(i_name, i_grade):
            raise ValueError(f"{csv_path} line {line} has {len(row)} values, expected {len(header)}: {row}.")
        name, grade = row[i_name], row[i_grade]
        if grade.lower() not in allowed:
            raise ValueError(
                f"{csv_path} line {line}: {name} has grade {grade!r}, which is not one of {list(class_names)}."
            )
        label = allowed[grade.lower()]
        if grades.setdefault(name, label) != label:
            raise ValueError(f"{csv_path} gives {name} two different grades (line {line}).")
    return grades


def read_split_csv(csv_path: str | Path) -> dict[str, int | None]:
    """``{name: label}`` of a split CSV with a ``name`` column and an optional ``label`` column (``name,label``, one
    image a row; the label is the class index, None where the column is absent or the cell empty).

    A name may carry an image extension (``train_3.bmp``); it is dropped.

    Raises:
        ValueError: the file is missing, has no ``name`` column, lists no image, or has a label that is not an integer.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise ValueError(f"split file {csv_path} not found.")
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f, skipinitialspace=True)
        fields = [h.strip() for h in reader.fieldnames or []]
        if "name" not in fields:
            raise ValueError(f"split file {csv_path} must have a 'name' column (name,label); found {fields}.")
        reader.fieldnames = fields
        rows = [
            (row["name"].strip(), (row.get("label") or "").strip()) for row in reader if (row["name"] or "").strip()
        ]
    if not rows:
        raise ValueError(f"split file {csv_path} lists no image: the split would be empty.")
    split = {}
    for name, label in rows:
        if label and not label.lstrip("-").isdigit():
            raise ValueError(f"split file {csv_path}: {name} has label {label!r}, not a class index (0, 1, ...).")
        name = name[: -len(Path(name).suffix)] if Path(name).suffix.lower() in IMAGE_EXTENSIONS else name
        split[name] = int(label) if label else None
    return split


def stratified_split(
    labels: Mapping[str, int], valid_fraction: float = DEFAULT_VALID_FRACTION, seed: int = 0
) -> tuple[list[str], list[str]]:
    """Seeded, class-stratified split of ``{name: label}`` into ``(train_names, valid_names)``.

    Each class gives ``round(n_class * valid_fraction)`` images to validation, clipped so that a class of two or
    more images has at least one in each split (a one-image class stays in training). Same ``labels`` and
    ``seed``, same split.

    Raises:
        ValueError: ``valid_fraction`` is not in (0, 1), or a split would be empty.
    """
    if not 0.0 < valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be in (0, 1), got {valid_fraction}.")
    rng = np.random.default_rng(seed)
    train, valid = [], []
    for label in sorted(set(labels.values())):
        names = sorted((n for n, y in labels.items() if y == label), key=_sort_key)
        names = [names[i] for i in rng.permutation(len(names))]
        n_valid = min(max(round(len(names) * valid_fraction), 1), len(names) - 1)  # 0 for a one-image class
        valid += names[:n_valid]
        train += names[n_valid:]
    if not train or not valid:
        raise ValueError(
            f"cannot split {len(labels)} image(s) with valid_fraction={valid_fraction}: a split would be empty."
        )
    return sorted(train, key=_sort_key), sorted(valid, key=_sort_key)


def _find_grade_csv(src: Path) -> Path:
    for path in src.iterdir():
        if path.name.lower() == "grade.csv":
            return path
    return src / "Grade.csv"


def _split_files(splits_dir: Path, fold: int) -> tuple[Path, Path]:
    return splits_dir / f"fold{fold}_train.csv", splits_dir / f"fold{fold}_valid.csv"


def _read_splits(
    splits_dir: Path,
    fold: int,
    src: Path,
    images: dict,
    grades: dict[str, int],
    grades_csv: Path,
    class_names: Sequence[str],
) -> dict[str, list[str]]:
    """The training and validation names of a fold's split files, checked against the images and their grades."""
    splits = {}
    seen: dict[str, Path] = {}
    for split, csv_path in zip(("training", "validation"), _split_files(splits_dir.resolve(), fold)):
        split_labels = read_split_csv(csv_path)
        splits[split] = list(split_labels)
        for name, label in split_labels.items():
            if name not in images:
                raise ValueError(f"split file {csv_path} names {name}, which is not an image of {src}.")
            if name in seen:
                raise ValueError(f"{name} is in two splits: {seen[name]} and {csv_path}.")
            if label is not None and name in grades and label != grades[name]:
                raise ValueError(
                    f"split file {csv_path} gives {name} the label {label}, but {grades_csv} grades it "
                    f"{class_names[grades[name]]} ({grades[name]}): correct one of the two files."
                )
            seen[name] = csv_path
    logger.info("GlaS split from %s (fold %d).", splits_dir, fold)
    return splits


def _item(name: str, split: str, images: dict, grades: dict[str, int], src: Path, require_train_masks: bool) -> dict:
    """The datalist item of image ``name``; an image without a mask is refused unless allowed."""
    image, mask = images[name]["image"], images[name]["mask"]
    item = {"image": str(image), "label": grades[name]}
    if mask is not None:
        item["mask"] = str(mask)
    elif require_train_masks or split != "training":
        hint = "; pass require_train_masks=False to train without it" if split == "training" else ""
        raise ValueError(f"image {image} has no mask {name}_anno.{_ANY_EXT} in {src}{hint}.")
    return item


def create_glas_datalist(
    src: str | Path,
    splits_dir: str | Path | None = None,
    fold: int = 0,
    seed: int = 0,
    valid_fraction: float = DEFAULT_VALID_FRACTION,
    require_train_masks: bool = True,
    class_names: Sequence[str] = GLAS_CLASS_NAMES,
) -> dict:
    """Build a MONAI datalist from a GlaS release folder.

    Args:
        src: folder with the images, their ``*_anno`` masks and ``Grade.csv``.
        splits_dir: folder with ``fold{fold}_train.csv`` and ``fold{fold}_valid.csv`` (``name,label``). When
            ``None``, ``<src>/splits`` is used if it holds them, else a seeded stratified split of ``train_*``.
        fold: which fold files to read from ``splits_dir``.
        seed: seed of the stratified split (unused with split files).
        valid_fraction: share of each class that goes to validation in the stratified split.
        require_train_masks: when ``False``, training images may lack a mask (their item has no ``"mask"`` key;
            use ``allow_missing_keys=True`` in the mask transforms). Validation and test images always need one.
        class_names: GlaS grades in label order.

    Returns:
        ``{"training": [...], "validation": [...], "test": [...], "labels": [...]}``; items are
        ``{"image": str, "label": int, "mask": str}`` with absolute paths; ``"test"`` (``testA_*``, ``testB_*``)
        is left out when there is no test image.

    Raises:
        ValueError: naming the file, for a missing ``Grade.csv``, an image without a ``Grade.csv`` row, an unknown
            grade, a split file naming an absent image (or an image in two splits), an empty split, or a missing mask.
    """
    src = Path(src).expanduser().resolve()
    images = find_glas_images(src)
    grades_csv = _find_grade_csv(src)
    grades = read_glas_grades(grades_csv, class_names)
    missing = [n for n in images if n not in grades]
    if missing:
        files = ", ".join(str(images[n]["image"]) for n in missing[:10]) + (" ..." if len(missing) > 10 else "")
        raise ValueError(
            f"{len(missing)} image(s) have no row in {grades_csv}: {files}. Add their grade or remove the images."
        )
    train_names = [n for n in images if n.startswith("train_")]
    if not train_names:
        raise ValueError(f"no training image (train_N.{_ANY_EXT}) in {src}.")
    if splits_dir is None and all(p.is_file() for p in _split_files(src / "splits", fold)):
        splits_dir = src / "splits"
    if splits_dir is not None:
        splits = _read_splits(Path(splits_dir), fold, src, images, grades, grades_csv, class_names)
    else:
        train, valid = stratified_split({n: grades[n] for n in train_names}, valid_fraction, seed)
        splits = {"training": train, "validation": valid}
    test_names = [n for n in images if not n.startswith("train_")]
    if test_names:
        splits["test"] = test_names
    datalist: dict = {
        split: [_item(name, split, images, grades, src, require_train_masks) for name in names]
        for split, names in splits.items()
    }
    return {**datalist, "labels": list(class_names)}
