"""Bad data in a user's folder stops the bundle with an error that names the file (or converts it and says so)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.test_bundle import workflow


def chain(error: BaseException) -> str:
    """Every message in an exception chain (MONAI wraps transform and config errors)."""
    messages = []
    while error is not None:
        messages.append(str(error))
        error = error.__cause__ or error.__context__
    return "\n".join(messages)


def write_image(path: Path, array: np.ndarray) -> str:
    Image.fromarray(array).save(path)
    return str(path)


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    files = {}
    for i in range(3):
        files[f"img{i}"] = write_image(tmp_path / f"img{i}.png", rng.integers(0, 255, (64, 80, 3), dtype=np.uint8))
        files[f"mask{i}"] = write_image(
            tmp_path / f"img{i}_anno.png", (rng.random((64, 80)) > 0.5).astype(np.uint8) * 255
        )
    return tmp_path, files


def build(tmp_path: Path, training: list, validation: list):
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": training, "validation": validation}))
    wf = workflow(tmp_path / "bundle", dataset_dir=str(tmp_path))
    wf.initialize()
    return wf


def item(files, i, label=0, image=None, mask=None):
    return {"image": image or files[f"img{i}"], "label": label, "mask": mask or files[f"mask{i}"]}


def test_label_not_in_class_list_names_the_file(folder):
    tmp_path, files = folder
    wf = build(tmp_path, [item(files, 0), item(files, 1, label=2)], [item(files, 2)])
    with pytest.raises(Exception) as info:
        wf.parser.get_parsed_content("train#dataset")
    text = chain(info.value)
    assert files["img1"] in text and "2" in text and "benign" in text


def test_mask_of_another_size_names_both_files(folder):
    tmp_path, files = folder
    small = write_image(tmp_path / "small_anno.png", np.zeros((32, 40), dtype=np.uint8))
    wf = build(tmp_path, [item(files, 0)], [item(files, 2, mask=small)])
    with pytest.raises(Exception) as info:
        wf.parser.get_parsed_content("validate#dataset")
    text = chain(info.value)
    assert files["img2"] in text and small in text


def test_unreadable_image_names_the_file(folder):
    tmp_path, files = folder
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png at all")
    wf = build(tmp_path, [item(files, 0, image=str(broken))], [item(files, 2)])
    with pytest.raises(Exception) as info:
        wf.parser.get_parsed_content("train#dataset")
    assert str(broken) in chain(info.value)


def test_empty_split_is_named(folder):
    tmp_path, files = folder
    wf = build(tmp_path, [item(files, 0)], [])
    with pytest.raises(Exception) as info:
        wf.parser.get_parsed_content("validate#dataset")
    assert "'validation' split" in chain(info.value) and "empty" in chain(info.value)


def test_missing_file_in_datalist_is_named(folder):
    tmp_path, files = folder
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": [item(files, 0, image=str(tmp_path / "gone.png"))], "validation": []}))
    wf = workflow(tmp_path / "bundle", dataset_dir=str(tmp_path))
    wf.initialize()
    with pytest.raises(Exception) as info:
        wf.parser.get_parsed_content("train#dataset")
    assert "gone.png does not exist" in chain(info.value)


def test_folder_without_datalist_says_how_to_make_one(tmp_path):
    wf = workflow(tmp_path / "bundle", dataset_dir=str(tmp_path))
    wf.initialize()
    with pytest.raises(Exception) as info:
        wf.parser.get_parsed_content("train#dataset")
    text = chain(info.value)
    assert f"datalist {tmp_path / 'datalist.json'} not found" in text and "scripts/prepare_glas.py" in text


def test_grey_and_rgba_images_are_converted_with_a_warning(folder, capsys):
    tmp_path, files = folder
    grey = write_image(tmp_path / "grey.png", np.full((64, 80), 100, dtype=np.uint8))
    rgba = write_image(tmp_path / "rgba.png", np.full((64, 80, 4), 200, dtype=np.uint8))
    wf = build(tmp_path, [item(files, 0, image=grey), item(files, 1, image=rgba)], [item(files, 2)])
    dataset = wf.parser.get_parsed_content("train#dataset")
    images = [dataset[i]["image"] for i in range(2)]
    assert all(tuple(x.shape) == (3, 64, 64) for x in images)  # RGB, cropped to the recipe's (overridden) 64
    logged = capsys.readouterr().out  # the bundle's logging.conf logs to stdout
    assert f"image {grey} has 1 channel (grey)" in logged and f"image {rgba} has 4 channels (RGBA)" in logged
