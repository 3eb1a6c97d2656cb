"""GlaS folder -> MONAI datalist: the shared GlaS copy, the official BMP format and a synthetic release folder."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from monai_wsl.data import create_glas_datalist, find_glas_images, read_glas_grades, stratified_split

REPO = Path(__file__).resolve().parents[1]
GRADE_HEADER = "name,patient ID, grade (GlaS), grade (Sirinukunwattana et al. 2015)\n"


def _official_grades(path: Path) -> dict[str, int]:
    """Grade.csv read independently of the module under test."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return {r[0].strip(): ["benign", "malignant"].index(r[2].strip()) for r in rows[1:] if r}


def _split_names(path: Path) -> list[str]:
    with open(path, newline="") as f:
        return [row["name"] for row in csv.DictReader(f)]


def make_glas_folder(root: Path, n_benign: int = 10, n_malignant: int = 12, tests: bool = True) -> dict[str, int]:
    """A GlaS-like release: BMP images, instance-id BMP masks, Grade.csv with leading spaces, testA/testB files."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    labels = {f"train_{i + 1}": int(i >= n_benign) for i in range(n_benign + n_malignant)}
    if tests:
        labels |= {"testA_1": 1, "testA_2": 0, "testB_1": 0}
    rows = []
    for name, label in labels.items():
        Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(root / f"{name}.bmp")
        mask = np.zeros((10, 12), dtype=np.uint8)
        mask[2:5, 2:5], mask[6:9, 7:11] = 1, 2  # two glands, instance ids 1 and 2
        Image.fromarray(mask).save(root / f"{name}_anno.bmp")
        grade = ["benign", "malignant"][label]
        rows.append(
            f"{name},{len(rows) % 7 + 1}, {grade}, {'adenomatous' if label == 0 else 'moderately differentiated'}"
        )
    (root / "Grade.csv").write_text(GRADE_HEADER + "\n".join(rows) + "\n")
    return labels


def _names(items: list[dict]) -> list[str]:
    return [Path(item["image"]).stem for item in items]


# --- shared GlaS copy (../shared/data) ------------------------------------------------------------------------------


def test_shared_glas_fold0(shared_data):
    glas = shared_data / "glas"
    datalist = create_glas_datalist(glas)  # finds glas/splits
    assert len(datalist["training"]) == 67 and len(datalist["validation"]) == 18
    assert "test" not in datalist and datalist["labels"] == ["benign", "malignant"]
    assert _names(datalist["training"]) == _split_names(glas / "splits" / "fold0_train.csv")
    assert _names(datalist["validation"]) == _split_names(glas / "splits" / "fold0_valid.csv")
    grades = _official_grades(glas / "Grade.csv")
    items = datalist["training"] + datalist["validation"]
    assert {Path(i["image"]).stem for i in items} == set(grades)  # all 85, none twice
    for item in items:
        assert item["label"] == grades[Path(item["image"]).stem]
        for key in ("image", "mask"):
            assert Path(item[key]).is_absolute() and Path(item[key]).is_file()
        assert Path(item["mask"]).name == Path(item["image"]).stem + "_anno.png"
    assert create_glas_datalist(glas, splits_dir=glas / "splits") == datalist


def test_shared_glas_split_labels_agree_with_grade_csv(shared_data):
    glas = shared_data / "glas"
    grades = read_glas_grades(glas / "Grade.csv")
    assert grades == _official_grades(glas / "Grade.csv") and len(grades) == 85
    for split in ("fold0_train", "fold0_valid"):
        with open(glas / "splits" / f"{split}.csv", newline="") as f:
            assert all(grades[r["name"]] == int(r["label"]) for r in csv.DictReader(f))


def test_official_bmp_sample(shared_data):
    sample = shared_data / "glas-bmp-sample"
    images = find_glas_images(sample)
    assert list(images) == ["train_1", "train_2", "train_12"]  # natural order
    assert all(e["image"].suffix == ".bmp" and e["mask"].name == f"{n}_anno.bmp" for n, e in images.items())
    assert read_glas_grades(sample / "Grade.csv") == {"train_1": 1, "train_2": 0, "train_12": 0}
    datalist = create_glas_datalist(sample, valid_fraction=0.5)
    # the only malignant image stays in training; one of the two benign ones is held out
    assert _names(datalist["validation"]) in (["train_2"], ["train_12"])
    assert "train_1" in _names(datalist["training"])


# --- synthetic GlaS-like release folder -----------------------------------------------------------------------------


def test_synthetic_folder_datalist(tmp_path):
    labels = make_glas_folder(tmp_path / "GlaS")
    datalist = create_glas_datalist(tmp_path / "GlaS", seed=3)
    assert _names(datalist["test"]) == ["testA_1", "testA_2", "testB_1"]
    train, valid = _names(datalist["training"]), _names(datalist["validation"])
    assert sorted(train + valid) == sorted(n for n in labels if n.startswith("train_"))
    assert not set(train) & set(valid)
    # stratified: round(n_class * 18/85) of each class in validation (10 benign -> 2, 12 malignant -> 3)
    assert sorted(labels[n] for n in valid) == [0, 0, 1, 1, 1]
    for item in datalist["training"] + datalist["validation"] + datalist["test"]:
        assert item["label"] == labels[Path(item["image"]).stem]  # " malignant" with its leading space parsed
        assert Path(item["mask"]).is_file() and item["mask"].endswith("_anno.bmp")


def test_seeded_split_is_deterministic(tmp_path):
    make_glas_folder(tmp_path, tests=False)
    a, b = create_glas_datalist(tmp_path, seed=7), create_glas_datalist(tmp_path, seed=7)
    assert a == b and "test" not in a
    valid_by_seed = {tuple(_names(create_glas_datalist(tmp_path, seed=s)["validation"])) for s in range(5)}
    assert len(valid_by_seed) > 1  # the seed matters


def test_stratified_split_fraction_and_errors():
    labels = {f"train_{i}": int(i % 3 == 0) for i in range(1, 31)}  # 20 benign, 10 malignant
    train, valid = stratified_split(labels, valid_fraction=0.3, seed=0)
    assert sorted(labels[n] for n in valid) == [0] * 6 + [1] * 3 and len(train) == 21
    with pytest.raises(ValueError, match="valid_fraction"):
        stratified_split(labels, valid_fraction=1.0)
    with pytest.raises(ValueError, match="empty"):
        stratified_split({"train_1": 0}, valid_fraction=0.5)


def test_splits_dir_and_extensions(tmp_path):
    labels = make_glas_folder(tmp_path, n_benign=3, n_malignant=3, tests=False)
    # other extensions are read alike
    for name, ext in (("train_1", ".png"), ("train_2", ".jpg"), ("train_4", ".tif")):
        Image.open(tmp_path / f"{name}.bmp").save(tmp_path / f"{name}{ext}")
        (tmp_path / f"{name}.bmp").unlink()
    splits = tmp_path / "my_splits"
    splits.mkdir()
    (splits / "fold1_train.csv").write_text("name,label\ntrain_1,0\ntrain_4,1\ntrain_5,1\ntrain_2,0\n")
    (splits / "fold1_valid.csv").write_text("name,label\ntrain_3,0\ntrain_6.bmp,1\n")
    datalist = create_glas_datalist(tmp_path, splits_dir=splits, fold=1)
    assert _names(datalist["training"]) == ["train_1", "train_4", "train_5", "train_2"]
    assert [Path(i["image"]).suffix for i in datalist["training"]] == [".png", ".tif", ".bmp", ".jpg"]
    assert _names(datalist["validation"]) == ["train_3", "train_6"]
    assert [i["label"] for i in datalist["validation"]] == [labels["train_3"], labels["train_6"]]


def test_cli_writes_datalist(tmp_path):
    make_glas_folder(tmp_path / "GlaS")
    out = tmp_path / "out" / "datalist.json"
    cmd = [sys.executable, "scripts/prepare_glas.py", "--src", str(tmp_path / "GlaS"), "--out", str(out)]
    result = subprocess.run(cmd + ["--seed", "3"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(out.read_text()) == create_glas_datalist(tmp_path / "GlaS", seed=3)
    assert "training: 17 (benign 8, malignant 9)" in result.stdout
    assert "validation: 5 (benign 2, malignant 3)" in result.stdout
    assert "test: 3 (benign 2, malignant 1)" in result.stdout
    (tmp_path / "GlaS" / "Grade.csv").unlink()
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "Grade.csv" in result.stderr


# --- clear errors that name the file --------------------------------------------------------------------------------


def test_error_missing_grade_csv(tmp_path):
    make_glas_folder(tmp_path)
    (tmp_path / "Grade.csv").unlink()
    with pytest.raises(ValueError, match=r"Grade\.csv not found"):
        create_glas_datalist(tmp_path)


def test_error_image_without_grade_row(tmp_path):
    make_glas_folder(tmp_path)
    lines = (tmp_path / "Grade.csv").read_text().splitlines()
    (tmp_path / "Grade.csv").write_text("\n".join(line for line in lines if not line.startswith("testB_1,")))
    with pytest.raises(ValueError, match=r"no row in .*Grade\.csv: .*testB_1\.bmp"):
        create_glas_datalist(tmp_path)


def test_error_unknown_grade(tmp_path):
    make_glas_folder(tmp_path)
    lines = (tmp_path / "Grade.csv").read_text().splitlines()
    lines = [line.replace(" benign", " adenoma") if line.startswith("train_3,") else line for line in lines]
    (tmp_path / "Grade.csv").write_text("\n".join(lines))
    with pytest.raises(ValueError) as err:
        create_glas_datalist(tmp_path)
    message = str(err.value)
    assert "Grade.csv" in message and "train_3" in message and "'adenoma'" in message
    assert "['benign', 'malignant']" in message


def test_error_split_names_absent_image_or_is_empty(tmp_path):
    make_glas_folder(tmp_path)
    splits = tmp_path / "splits"
    splits.mkdir()
    (splits / "fold0_train.csv").write_text("name,label\ntrain_1,0\ntrain_99,1\n")
    (splits / "fold0_valid.csv").write_text("name,label\ntrain_2,0\n")
    with pytest.raises(ValueError, match=r"fold0_train\.csv names train_99"):
        create_glas_datalist(tmp_path)
    (splits / "fold0_train.csv").write_text("name,label\n")
    with pytest.raises(ValueError, match=r"fold0_train\.csv lists no image"):
        create_glas_datalist(tmp_path)
    (splits / "fold0_train.csv").write_text("name,label\ntrain_2,0\n")
    with pytest.raises(ValueError, match=r"train_2 is in two splits"):
        create_glas_datalist(tmp_path)


def test_error_missing_mask(tmp_path):
    make_glas_folder(tmp_path, tests=False)
    (tmp_path / "train_5_anno.bmp").unlink()
    with pytest.raises(ValueError, match=r"train_5\.bmp has no mask train_5_anno"):
        create_glas_datalist(tmp_path)
    # masks are optional for training on request only; validation images still need one
    splits = tmp_path / "splits"
    splits.mkdir()
    (splits / "fold0_train.csv").write_text("name\ntrain_5\ntrain_12\n")
    (splits / "fold0_valid.csv").write_text("name\ntrain_1\n")
    datalist = create_glas_datalist(tmp_path, require_train_masks=False)
    assert "mask" not in datalist["training"][0] and "mask" in datalist["training"][1]
    (splits / "fold0_valid.csv").write_text("name\ntrain_5\n")
    (splits / "fold0_train.csv").write_text("name\ntrain_1\n")
    with pytest.raises(ValueError, match=r"train_5\.bmp has no mask"):
        create_glas_datalist(tmp_path, require_train_masks=False)


def test_error_duplicate_image_and_empty_folder(tmp_path):
    make_glas_folder(tmp_path, tests=False)
    Image.open(tmp_path / "train_3.bmp").save(tmp_path / "train_3.png")
    with pytest.raises(ValueError, match=r"train_3\.bmp and train_3\.png"):
        create_glas_datalist(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no GlaS image"):
        create_glas_datalist(tmp_path / "empty")
