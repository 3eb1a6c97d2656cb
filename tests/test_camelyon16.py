"""CAMELYON16-P512: scripts/prepare_camelyon16.py on a release written here (pyramidal TIFF slides with tissue on glass,
ASAP XML lesion polygons, a reference CSV), checked against the slides' own geometry, then trained and evaluated
through the bundle with recipes/camelyon16.json. Patches are 64 pixels (the protocol's 512 is the default; one test
runs it) so that the slides stay small."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from monai_wsl.data import DataError
from monai_wsl.data.camelyon16 import fill_polygon, normal_quotas, rasterize_annotation, read_asap_annotation
from monai_wsl.data.slides import write_rgb_pyramid
from tests.scripts import load_script

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
PATCH = 64
H, W = 1024, 1536
GLASS, PINK, PURPLE = (242, 240, 244), (225, 130, 190), (140, 60, 170)
#: tissue rectangles (x0, y0, x1, y1), on multiples of 16 pixels: the tissue level (downsample 4) sees them exactly
RECTS = [(64, 80, 704, 880), (960, 128, 1408, 896)]


prepare = load_script("prepare_camelyon16")


def ellipse(cx: float, cy: float, rx: float, ry: float, n: int = 60, phase: float = 0.3) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False) + phase
    return np.stack([cx + rx * np.cos(t) * (1 + 0.15 * np.sin(3 * t)), cy + ry * np.sin(t)], 1)


#: the lesion: a large wavy ellipse that runs over glass between the tissue blocks, with a hole (_2), and a small one
TUMOUR = [ellipse(500.3, 420.7, 330.1, 250.4), ellipse(1200.5, 700.2, 90.2, 70.7, 30)]
HOLE = [ellipse(520.2, 400.9, 40.3, 35.1, 20)]


def reference_inside(poly: np.ndarray, x0: int, y0: int, w: int, h: int) -> np.ndarray:
    """Pixel centres inside a polygon by the crossing number, point by point (the test's own rasteriser)."""
    yy, xx = np.mgrid[y0 : y0 + h, x0 : x0 + w] + 0.5
    inside = np.zeros((h, w), bool)
    for (xa, ya), (xb, yb) in zip(poly, np.roll(poly, -1, axis=0)):
        if ya == yb:
            continue
        rows = (min(ya, yb) <= yy) & (yy < max(ya, yb))
        inside ^= rows & (xa + (yy - ya) * (xb - xa) / (yb - ya) <= xx)
    return inside


def reference_mask(x0: int, y0: int, w: int, h: int) -> np.ndarray:
    mask = np.zeros((h, w), bool)
    for poly in TUMOUR:
        mask |= reference_inside(poly, x0, y0, w, h)
    for poly in HOLE:
        mask &= ~reference_inside(poly, x0, y0, w, h)
    return mask


def tissue_fraction(x: int, y: int, size: int = PATCH) -> float:
    area = sum(
        max(0, min(x + size, x1) - max(x, x0)) * max(0, min(y + size, y1) - max(y, y0)) for x0, y0, x1, y1 in RECTS
    )
    return area / size**2


def asap_xml(path: Path, polygons: list[tuple[str, np.ndarray]]) -> None:
    lines = ['<?xml version="1.0"?>', "<ASAP_Annotations>", "<Annotations>"]
    for i, (group, points) in enumerate(polygons):
        lines.append(f'<Annotation Name="Annotation {i}" Type="Polygon" PartOfGroup="{group}" Color="#F4FA58">')
        lines.append("<Coordinates>")
        lines += [f'<Coordinate Order="{j}" X="{float(x)!r}" Y="{float(y)!r}" />' for j, (x, y) in enumerate(points)]
        lines += ["</Coordinates>", "</Annotation>"]
    lines += ["</Annotations>", "<AnnotationGroups />", "</ASAP_Annotations>"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


def slide_pixels(tumour: bool) -> np.ndarray:
    rgb = np.empty((H, W, 3), np.uint8)
    rgb[:] = GLASS
    tissue = np.zeros((H, W), bool)
    for x0, y0, x1, y1 in RECTS:
        tissue[y0:y1, x0:x1] = True
    rgb[tissue] = PINK
    if tumour:
        rgb[tissue & reference_mask(0, 0, W, H)] = PURPLE
    return rgb


TRAIN_TUMOUR, TRAIN_NORMAL = ("tumor_001", "tumor_002"), ("normal_001", "normal_002")


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    """A CAMELYON16 release: 2 tumour and 2 normal training slides, a tumour and a normal test slide (test_001,
    test_002), the annotations and reference.csv; test_114 (excluded by the protocol) is there and unannotated."""
    root = tmp_path_factory.mktemp("camelyon16")
    tumour_slide, normal_slide = root / "tumour.tif", root / "normal.tif"
    write_rgb_pyramid(tumour_slide, slide_pixels(True), mpp=0.243)
    write_rgb_pyramid(normal_slide, slide_pixels(False), mpp=0.243)
    polygons = [("_0", TUMOUR[0]), ("_2", HOLE[0]), ("_1", TUMOUR[1])]
    for name in TRAIN_TUMOUR + ("test_001",):
        folder = "training/tumor" if name.startswith("tumor") else "testing/images"
        notes = "training" if name.startswith("tumor") else "testing"
        (root / folder).mkdir(parents=True, exist_ok=True)
        shutil.copy(tumour_slide, root / folder / f"{name}.tif")
        asap_xml(root / notes / "lesion_annotations" / f"{name}.xml", polygons)
    for name in TRAIN_NORMAL + ("test_002", "test_114"):
        folder = root / ("training/normal" if name.startswith("normal") else "testing/images")
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(normal_slide, folder / f"{name}.tif")
    (root / "testing" / "reference.csv").write_text("Test_001,Tumor,Macro\nTest_002,Normal\nTest_114,Tumor,Micro\n")
    tumour_slide.unlink()
    normal_slide.unlink()
    return root


def run_prepare(src: Path, out: Path, *extra: str) -> dict:
    args = ["--src", str(src), "--out", str(out), "--patch-size", str(PATCH), "--workers", "1", "--no-progress"]
    assert prepare.main([*args, *extra]) == 0
    return json.loads((out / "datalist.json").read_text())


@pytest.fixture(scope="module")
def prepared(release, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("p64") / "out"
    return out, run_prepare(release, out)


def items(datalist: dict) -> list[tuple[str, dict]]:
    return [(split, item) for split in ("training", "validation", "test") for item in datalist.get(split, [])]


def test_the_datalist_holds_every_split_with_the_documented_fields(prepared):
    out, datalist = prepared
    assert {"training", "validation", "test"} <= datalist.keys()
    assert datalist["labels"] == ["normal", "metastatic"] and datalist["missing_mask"] == "empty"
    for _, item in items(datalist):
        assert {"image", "label", "slide", "x", "y", "tissue", "metastatic"} <= item.keys()
        assert ("mask" in item) == (item["label"] == 1)
        assert 0.0 <= item["tissue"] <= 1.0 and 0.0 <= item["metastatic"] <= 1.0
        assert item["x"] % PATCH == 0 and item["y"] % PATCH == 0  # the level-0 grid, no overlap
        assert (out / item["image"]).is_file()
    assert not any("test_114" in item["slide"] for _, item in items(datalist))


def test_every_patch_is_the_slide_there_and_its_mask_the_polygons_rasterised_exactly(prepared, release):
    """The masks equal the annotation rasterised at level 0 on the patch pixel for pixel (pixel centres, even-odd;
    no anti-aliasing), by the test's own point-by-point crossing number; the images are the slide's level-0 pixels."""
    out, datalist = prepared
    level0 = {}
    metastatic = 0
    for _, item in items(datalist):
        folder = "training/tumor" if item["slide"].startswith("tumor") else "training/normal"
        folder = "testing/images" if item["slide"].startswith("test") else folder
        if item["slide"] not in level0:
            level0[item["slide"]] = tifffile.imread(release / folder / f"{item['slide']}.tif", key=0)
        x, y = item["x"], item["y"]
        image = np.asarray(Image.open(out / item["image"]))
        assert np.array_equal(image, level0[item["slide"]][y : y + PATCH, x : x + PATCH]), item["image"]
        expected = reference_mask(x, y, PATCH, PATCH)
        if item["label"] == 1:
            mask = np.asarray(Image.open(out / item["mask"]))
            assert set(np.unique(mask)) <= {0, 255}
            assert np.array_equal(mask > 0, expected), item["mask"]
            assert item["metastatic"] == pytest.approx(expected.mean(), abs=1e-6)
            metastatic += 1
        else:
            assert not expected.any() or item["slide"].startswith("normal") or item["slide"] == "test_002"
            assert not (out / "masks" / item["slide"]).exists()  # normal patches: no mask file
    assert metastatic >= 30


def test_tissue_and_metastatic_fraction_rules_hold_and_each_rejects_patches(prepared):
    out, datalist = prepared
    kept = {(i["slide"], i["x"], i["y"]): i for _, i in items(datalist)}
    for item in kept.values():
        assert item["tissue"] == pytest.approx(tissue_fraction(item["x"], item["y"]), abs=1e-6)
        assert item["tissue"] >= 0.1
        assert item["metastatic"] >= 0.2 if item["label"] == 1 else item["metastatic"] == 0.0
    # every grid patch of a tumour slide, from the slide's own geometry
    grid = [(x, y) for y in range(0, H - PATCH + 1, PATCH) for x in range(0, W - PATCH + 1, PATCH)]
    p = {xy: reference_mask(*xy, PATCH, PATCH).mean() for xy in grid}
    t = {xy: tissue_fraction(*xy) for xy in grid}
    no_tissue = [xy for xy in grid if p[xy] >= 0.2 and t[xy] < 0.1]
    too_little = [xy for xy in grid if t[xy] >= 0.1 and 0 < p[xy] < 0.2]
    low = [xy for xy in grid if t[xy] >= 0.1 and 0.2 <= p[xy] <= 0.5]
    high = [xy for xy in grid if t[xy] >= 0.1 and p[xy] > 0.5]
    assert no_tissue and too_little, "the slide must give patches rejected by each rule"
    assert len(high) > len(low) > 0, "the slide must give patches for the p > 0.5 subsampling"
    for slide in TRAIN_TUMOUR + ("test_001",):
        mine = {(x, y) for (s, x, y) in kept if s == slide}
        assert not mine & set(no_tissue) and not mine & set(too_little)
        assert set(low) <= mine  # all patches of 0.2 <= p <= 0.5 kept
        kept_high = mine & set(high)
        assert len(kept_high) == len(low) and mine == set(low) | kept_high  # p > 0.5: as many as those, at random
    subsets = [frozenset((x, y) for (s, x, y) in kept if s == slide) & set(high) for slide in TRAIN_TUMOUR]
    assert subsets[0] != subsets[1]  # each slide draws its own subset


def test_normal_patches_come_from_normal_slides_only_as_many_as_metastatic_per_split(prepared):
    _, datalist = prepared
    for split in ("training", "validation", "test"):
        labels = [i["label"] for i in datalist[split]]
        assert labels.count(0) == labels.count(1) > 0
        for item in datalist[split]:
            from_normal_slide = item["slide"].startswith("normal") or item["slide"] == "test_002"
            assert from_normal_slide == (item["label"] == 0), item
    counts = {}
    for _, item in items(datalist):
        if item["label"] == 0:
            counts[item["slide"]] = counts.get(item["slide"], 0) + 1
    assert len(counts) == 3  # normal_001, normal_002, test_002


def test_no_slide_is_in_two_splits_and_the_split_csvs_match(prepared):
    out, datalist = prepared
    slides = {split: {i["slide"] for i in datalist[split]} for split in ("training", "validation", "test")}
    assert not slides["training"] & slides["validation"] and not slides["training"] & slides["test"]
    assert not slides["validation"] & slides["test"]
    assert slides["test"] == {"test_001", "test_002"}
    assert len(slides["training"]) == len(slides["validation"]) == 2  # one tumour and one normal slide each
    for split in ("training", "validation", "test"):
        with open(out / "splits" / f"{split}.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert [r["image"] for r in rows] == [i["image"] for i in datalist[split]]
        assert [int(r["label"]) for r in rows] == [i["label"] for i in datalist[split]]
        assert [r["mask"] for r in rows] == [i.get("mask", "") for i in datalist[split]]


def _files(out: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(out)): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and ".work" not in p.relative_to(out).parts
    }


def test_same_seed_same_files_and_a_second_run_continues(prepared, release, tmp_path):
    out, datalist = prepared
    first = _files(out)
    # another folder, the same seed, 2 worker processes: the same files, byte for byte
    again = run_prepare(release, tmp_path / "again", "--workers", "2")
    assert again == datalist and _files(tmp_path / "again") == first
    # a rerun in the same folder redoes nothing
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert prepare.main(["--src", str(release), "--out", str(out), "--patch-size", str(PATCH), "--no-progress"]) == 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == stamps
    # an interrupted run (a patch, the slide's marker and the datalist missing) is completed, the rest left as is
    victim = next(i for i in datalist["training"] if i["label"] == 1)
    (out / victim["image"]).unlink()
    (out / ".work" / "done" / f"{victim['slide']}.json").unlink()
    (out / "datalist.json").unlink()
    kept = {p: s for p, s in stamps.items() if p.exists()}
    kept.pop(out / ".work" / "done" / f"{victim['slide']}.json", None)
    from monai_wsl.data.camelyon16 import prepare_camelyon16

    result = prepare_camelyon16(release, out, patch_size=PATCH, progress=False)
    assert result["_written"] == 1 and _files(out) == first
    assert all(p.stat().st_mtime_ns == s for p, s in kept.items())
    # another seed draws other patches; other settings in the same folder are refused
    other = run_prepare(release, tmp_path / "seed1", "--seed", "1")
    assert {i["image"] for _, i in items(other)} != {i["image"] for _, i in items(datalist)}
    with pytest.raises(DataError, match="other settings.*seed"):
        prepare_camelyon16(release, out, patch_size=PATCH, seed=1, progress=False)


def small_release(release: Path, root: Path) -> Path:
    """One tumour and one normal training slide of ``release`` (hard links)."""
    for rel in ("training/tumor/tumor_001.tif", "training/normal/normal_001.tif", "training/lesion_annotations"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        if (release / rel).is_dir():
            shutil.copytree(release / rel, root / rel)
        else:
            os.link(release / rel, root / rel)
    (root / "training/lesion_annotations/tumor_002.xml").unlink()
    return root


def refused(src: Path, out: Path, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        prepare.main(["--src", str(src), "--out", str(out), "--patch-size", str(PATCH), "--no-progress"])
    assert e.value.code == 1
    assert not (out / "datalist.json").exists()
    return capsys.readouterr().err


def test_bad_inputs_are_refused_naming_the_file(release, tmp_path, capsys):
    src = small_release(release, tmp_path / "src")
    xml = src / "training/lesion_annotations/tumor_001.xml"
    # an annotation without polygons
    good = xml.read_text()
    xml.write_text('<?xml version="1.0"?><ASAP_Annotations><Annotations /></ASAP_Annotations>')
    err = refused(src, tmp_path / "out1", capsys)
    assert f"annotation {xml} holds no tumour polygon" in err
    # a polygon outside the slide
    asap_xml(xml, [("_0", TUMOUR[0]), ("_0", TUMOUR[1] + [5000, 0])])
    err = refused(src, tmp_path / "out2", capsys)
    assert f"annotation {xml}: tumour polygon 1" in err and "wholly outside slide" in err and "1536 x 1024" in err
    # a tumour slide without its annotation
    xml.unlink()
    err = refused(src, tmp_path / "out3", capsys)
    assert f"tumour slide {src / 'training/tumor/tumor_001.tif'} has no annotation {xml}" in err
    xml.write_text(good)
    # a slide that cannot be read, and one that is not there as the reference CSV says
    bad = src / "training/normal/normal_003.tif"
    bad.write_bytes(b"not a slide" * 100)
    err = refused(src, tmp_path / "out4", capsys)
    assert f"slide {bad} cannot be read" in err
    bad.unlink()
    (src / "testing/images").mkdir(parents=True)
    os.link(release / "testing/images/test_002.tif", src / "testing/images/test_002.tif")
    err = refused(src, tmp_path / "out5", capsys)
    assert f"{src / 'testing' / 'reference.csv'} not found" in err
    # the error is the DataError of the library, raised before anything is written
    assert not any((tmp_path / f"out{i}" / "images").exists() for i in range(1, 6))


def test_asap_groups_and_the_pixel_centre_rule():
    """_0 and _1 are tumour, _2 is cut out; a centre on a left or top edge is inside, on a right or bottom one
    outside; self-intersecting polygons are even-odd; random polygons agree with the crossing number point by
    point."""
    square = np.array([[2.5, 1.5], [5.5, 1.5], [5.5, 4.5], [2.5, 4.5]])  # centres exactly on all four edges
    filled = fill_polygon(square, 0, 0, 8, 6)
    expected = np.zeros((6, 8), bool)
    expected[1:4, 2:5] = True  # rows 1..3 (centres 1.5..3.5), columns 2..4 (centres 2.5..4.5)
    assert np.array_equal(filled, expected)
    bowtie = np.array([[0.0, 0.0], [10.0, 10.0], [10.0, 0.0], [0.0, 10.0]])
    assert np.array_equal(fill_polygon(bowtie, 0, 0, 10, 10), reference_inside(bowtie, 0, 0, 10, 10))
    rng = np.random.default_rng(0)
    for _ in range(5):
        poly = rng.uniform(-20, 120, size=(rng.integers(3, 40), 2))
        x0, y0 = (int(v) for v in rng.integers(-10, 40, 2))
        assert np.array_equal(fill_polygon(poly, x0, y0, 64, 48), reference_inside(poly, x0, y0, 64, 48))
    tumour = np.array([[0.0, 0.0], [20.0, 0.0], [20.0, 20.0], [0.0, 20.0]])
    hole = np.array([[5.0, 5.0], [15.0, 5.0], [15.0, 15.0], [5.0, 15.0]])
    mask = rasterize_annotation([tumour], [hole], 0, 0, 20)
    assert mask.sum() == 400 - 100 and not mask[5:15, 5:15].any()


def test_read_asap_annotation_keeps_the_groups(tmp_path):
    xml = tmp_path / "a.xml"
    asap_xml(xml, [("_0", TUMOUR[0]), ("_2", HOLE[0]), ("_1", TUMOUR[1])])
    tumour, excluded = read_asap_annotation(xml)
    assert len(tumour) == 2 and len(excluded) == 1 and np.allclose(excluded[0], HOLE[0])
    asap_xml(xml, [("Bone", TUMOUR[0])])
    with pytest.raises(DataError, match="group 'Bone'"):
        read_asap_annotation(xml)
    xml.write_text("<ASAP_Annotations><Annotations>")
    with pytest.raises(DataError, match=f"annotation {xml} is not a readable ASAP XML"):
        read_asap_annotation(xml)


def test_normal_patches_are_shared_evenly_among_the_normal_slides():
    assert normal_quotas({"a": 100, "b": 100, "c": 100}, 30) == {"a": 10, "b": 10, "c": 10}
    assert normal_quotas({"a": 3, "b": 100}, 30) == {"a": 3, "b": 27}  # what a slide cannot give, the other does
    assert normal_quotas({"a": 3, "b": 4}, 30) == {"a": 3, "b": 4}


def test_the_nan_rule_gives_the_papers_per_class_conventions():
    """F1+ of a normal patch (no foreground) and F1- of a patch wholly tumour (no background) are NaN and left out of
    MONAI's mean: F1+ is then the mean over the metastatic patches only, F1- over the patches with some background."""
    from monai.metrics import DiceMetric

    gt = torch.zeros(3, 1, 8, 8)
    gt[1, :, :4] = 1  # half tumour
    gt[2] = 1  # wholly tumour
    seg = torch.zeros(3, 1, 8, 8)
    seg[0, :, :2] = 1  # a false positive on the normal patch
    seg[1, :, :2] = 1
    seg[2, :, :6] = 1
    f1_pos, f1_neg = DiceMetric(ignore_empty=True), DiceMetric(ignore_empty=True)
    f1_pos(seg, gt)
    f1_neg(1 - seg, 1 - gt)
    pos, neg = f1_pos.get_buffer().flatten(), f1_neg.get_buffer().flatten()
    assert math.isnan(pos[0]) and not math.isnan(pos[1]) and math.isnan(neg[2])
    assert f1_pos.aggregate().item() == pytest.approx((2 * 16 / (16 + 32) + 2 * 48 / (48 + 64)) / 2)
    assert f1_neg.aggregate().item() == pytest.approx((2 * 48 / (48 + 64) + 2 * 32 / (32 + 48)) / 2)


@pytest.mark.slow  # a training and an evaluation (25 s)
def test_one_epoch_through_the_bundle_then_evaluation_with_the_per_class_conventions(prepared, tmp_path):
    out, datalist = prepared
    root = tmp_path / "bundle"
    small = ["--max_epochs", "1", "--crop_size", "56", "--resize_short_side", "64", "--num_workers", "0"]
    small += ["--progress_bar", "false", "--bundle_root", str(root), "--dataset_dir", str(out)]
    files = ["--meta_file", str(CONFIGS / "metadata.json"), "--logging_file", str(CONFIGS / "logging.conf")]
    recipe = [str(CONFIGS / "train.json"), str(CONFIGS / "recipes" / "camelyon16.json")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    train = [sys.executable, "-m", "monai.bundle", "run", "--config_file", json.dumps(recipe), *files, *small]
    result = subprocess.run(train, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Epoch[1] Metrics -- val_accuracy" in result.stdout + result.stderr
    card = json.loads((root / "models" / "model_card.json").read_text())
    assert card["trained_on"]["class_names"] == ["normal", "metastatic"] and card["trained_on"]["max_epochs"] == 1

    evaluate = [*train[:5], json.dumps([*recipe, str(CONFIGS / "evaluate.json")]), *files, *small]
    result = subprocess.run([*evaluate, "--eval_split", "test"], capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = result.stdout + result.stderr
    test = datalist["test"]
    n_metastatic = sum(i["label"] for i in test)
    n_background = sum(i["metastatic"] < 1.0 for i in test)
    assert 0 < n_background < len(test)  # some test patches are wholly tumour: no F1-
    with open(root / "eval" / "summary.csv", newline="") as f:
        summary = {r["score"]: r for r in csv.DictReader(f)}
    assert (
        int(summary["f1_pos"]["images"]) == n_metastatic
        and int(summary["f1_pos"]["left_out"]) == len(test) - n_metastatic
    )
    assert int(summary["f1_neg"]["images"]) == n_background
    assert f"f1_pos: {float(summary['f1_pos']['mean']):.4f} over {n_metastatic} image(s)" in log
    assert "left out: no foreground in the ground truth (a normal patch)" in log
    with open(root / "eval" / "scores.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(test)
    by_name = {Path(r["image"]).name: r for r in rows}
    for item in test:
        row = by_name[Path(item["image"]).name]
        assert int(row["label"]) == item["label"]
        assert (row["f1_pos"] == "nan") == (item["label"] == 0)
        assert (row["f1_neg"] == "nan") == (item["metastatic"] == 1.0)
        assert float(row["foreground"]) == pytest.approx(item["metastatic"], abs=1e-5)
    # MONAI's metrics (metrics.csv) follow the same rule: the same means
    with open(root / "eval" / "metrics.csv", newline="") as f:
        metrics = {name: float(value) for name, value in csv.reader(f)}
    for mine, monai_name in (("f1_pos", "val_f1_pos"), ("f1_neg", "val_f1_neg"), ("iou_pos", "val_iou_pos")):
        assert float(summary[mine]["mean"]) == pytest.approx(metrics[monai_name], abs=1e-4)


def test_the_protocols_512_pixel_patches(release, tmp_path):
    """The default patch size on 2048 x 2048 slides: one tumour and one normal slide in each of training and
    validation; masks equal the rasterised polygons."""
    src = tmp_path / "src"
    scale = 2048 / 1024
    rgb = {t: np.repeat(np.repeat(slide_pixels(t)[:, :1024], 2, 0), 2, 1) for t in (True, False)}
    polygons = [("_0", TUMOUR[0] * scale), ("_2", HOLE[0] * scale)]
    for name, tumour in (("tumor_001", True), ("tumor_002", True), ("normal_001", False), ("normal_002", False)):
        folder = src / "training" / ("tumor" if tumour else "normal")
        folder.mkdir(parents=True, exist_ok=True)
        write_rgb_pyramid(folder / f"{name}.tif", rgb[tumour])
        if tumour:
            asap_xml(src / "training/lesion_annotations" / f"{name}.xml", polygons)
    assert prepare.main(["--src", str(src), "--out", str(tmp_path / "out"), "--workers", "1", "--no-progress"]) == 0
    datalist = json.loads((tmp_path / "out" / "datalist.json").read_text())
    kept = [i for _, i in items(datalist)]
    assert {i["label"] for i in kept} == {0, 1} and all(i["x"] % 512 == 0 for i in kept)
    for item in (i for i in kept if i["label"] == 1):
        mask = np.asarray(Image.open(tmp_path / "out" / item["mask"])) > 0
        expected = np.zeros((512, 512), bool)
        expected |= reference_inside(TUMOUR[0] * scale, item["x"], item["y"], 512, 512)
        expected &= ~reference_inside(HOLE[0] * scale, item["x"], item["y"], 512, 512)
        assert np.array_equal(mask, expected) and item["metastatic"] >= 0.2
        assert np.asarray(Image.open(tmp_path / "out" / item["image"])).shape == (512, 512, 3)


def test_a_missing_mask_is_all_zero_only_where_the_datalist_says_so(prepared):
    """check_run refuses a scored item without a mask, unless the datalist says "missing_mask": "empty"; EmptyMaskd
    then gives it an all-zero mask of its image's size."""
    from monai.transforms import EnsureChannelFirstd, LoadImaged

    from monai_wsl.data import check_run
    from monai_wsl.transforms import EmptyMaskd

    out, datalist = prepared
    check_run(out / "datalist.json", {"validation": True}, ("normal", "metastatic"))
    plain = out.parent / "plain.json"
    plain.write_text(json.dumps({k: v for k, v in datalist.items() if k != "missing_mask"}))
    with pytest.raises(DataError, match='has no \'mask\'.*"missing_mask": "empty"'):
        check_run(plain, {"validation": True}, ("normal", "metastatic"))
    normal = next(i for i in datalist["validation"] if i["label"] == 0)
    item = {"image": str(out / normal["image"]), "label": 0}
    item = EnsureChannelFirstd("image")(LoadImaged("image", image_only=True)(item))
    mask = EmptyMaskd("mask")(item)["mask"]
    assert tuple(mask.shape) == (1, PATCH, PATCH) and not mask.any()
    assert mask.meta["filename_or_obj"] == item["image"].meta["filename_or_obj"]
