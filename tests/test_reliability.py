"""Bad input never becomes silent garbage or lost work: each case below runs the bundle as a user does
(``python -m monai.bundle run``, or ``scripts/prepare_glas.py``) and must stop with exit code 1, a message that names
the file and says what is wrong, and the ``model.pt`` already in the bundle root unchanged (sha256).

``CASES`` is also the table of docs/reliability.md: ``python tests/test_reliability.py`` rewrites it, and
``test_reliability_doc_is_the_case_table`` fails when the two differ.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
DOC = REPO / "docs" / "reliability.md"
SETTINGS = ["--max_epochs", "1", "--resize_short_side", "64", "--crop_size", "48", "--num_workers", "0"]
SETTINGS += ["--progress_bar", "false", "--network_def#pretrained", "false"]


@dataclass
class Scene:
    """A bundle root holding an earlier run's model.pt, and a small valid dataset (4 training, 2 validation images of
    64 x 64 with their masks) that each case breaks in one way."""

    root: Path
    data: Path
    work: Path

    def datalist(self) -> dict:
        return json.loads((self.data / "datalist.json").read_text())

    def write_datalist(self, content: dict) -> None:
        (self.data / "datalist.json").write_text(json.dumps(content))

    def file(self, split: str, i: int, key: str = "image") -> Path:
        return self.data / self.datalist()[split][i][key]

    def set_item(self, split: str, i: int, **values) -> None:
        content = self.datalist()
        content[split][i].update(values)
        self.write_datalist(content)

    def drop_key(self, split: str, i: int, key: str) -> None:
        content = self.datalist()
        del content[split][i][key]
        self.write_datalist(content)

    def checkpoint(self, net: torch.nn.Module, name: str = "other.pt") -> Path:
        path = self.work / name
        torch.save(net.state_dict(), path)
        return path

    def folder_of_images(self, *names: str) -> Path:
        folder = self.work / "images"
        folder.mkdir(exist_ok=True)
        for name in names:
            shutil.copy(self.file("validation", 0), folder / name)
        return folder


@dataclass
class Case:
    """One bad input: what the user has, the command, what the message must say (besides the file)."""

    title: str
    kind: str  # train, evaluate, infer or prepare_glas
    says: str
    setup: Callable[[Scene], tuple[list[str], list[Path]]]  # -> extra arguments, files the message must name


def truncated(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def as_jpeg(scene: Scene, split: str, i: int) -> Path:
    source = scene.file(split, i)
    target = source.with_suffix(".jpg")
    Image.open(source).convert("RGB").save(target, quality=90)
    scene.set_item(split, i, image=target.name)
    return target


def tiff(scene: Scene, array: np.ndarray, name: str) -> Path:
    import tifffile

    path = scene.data / name
    tifffile.imwrite(path, array, photometric="rgb" if array.ndim == 3 and array.shape[-1] == 3 else "minisblack")
    scene.set_item("training", 0, image=name)
    return path


def maxmin_lite0() -> torch.nn.Module:
    from monai_wsl.networks import MaxMinUncertaintyNet

    return MaxMinUncertaintyNet(encoder="efficientnet-lite0")


def nan_nifti(scene: Scene) -> Path:
    import nibabel as nib

    pixels = np.full((64, 64), 120.0, dtype=np.float32)
    pixels[10:20, 10:20] = np.nan  # a NaN patch
    path = scene.data / "training_nan.nii.gz"
    nib.save(nib.Nifti1Image(pixels, np.eye(4)), path)
    scene.set_item("training", 1, image=path.name)
    return path


def _case(title: str, kind: str, says: str):
    def register(setup):
        CASES.append(Case(title, kind, says, setup))
        return setup

    return register


CASES: list[Case] = []

# --- images -----------------------------------------------------------------------------------------------------------


@_case("a truncated JPEG in the training set", "train", "cannot be read (OSError: image file is truncated")
def _truncated_jpeg(s):
    return [], [truncated(as_jpeg(s, "training", 2))]


@_case("a truncated image in an inference folder", "infer", "cannot be read")
def _truncated_inference(s):
    folder = s.folder_of_images("a.png", "b.png")
    return ["--dataset_dir", str(folder)], [truncated(folder / "b.png")]


@_case("an empty (0-byte) image file", "train", "is empty (0 bytes)")
def _empty(s):
    s.file("training", 1).write_bytes(b"")
    return [], [s.file("training", 1)]


@_case("a file that is not an image", "train", "cannot be read (UnidentifiedImageError")
def _not_an_image(s):
    s.file("validation", 1).write_text("these are notes, not pixels")
    return [], [s.file("validation", 1)]


@_case("a 16-bit RGB TIFF (ITK cannot load it)", "train", "is a 16-bit RGB TIFF")
def _rgb16(s):
    return [], [tiff(s, np.random.default_rng(0).integers(0, 65535, (64, 64, 3), dtype=np.uint16), "rgb16.tif")]


@_case("a floating-point TIFF", "train", "is a floating-point TIFF")
def _float_tiff(s):
    return [], [tiff(s, np.random.default_rng(0).random((64, 64, 3), dtype=np.float32), "float.tif")]


@_case("a TIFF with 5 channels", "train", "expected a 2D image (height, width) with 1 to 4 channels")
def _five_channels(s):
    return [], [tiff(s, np.random.default_rng(0).integers(0, 255, (64, 64, 5), dtype=np.uint8), "five.tif")]


@_case("an image with a NaN patch", "train", "non-finite pixel value(s) (NaN or Inf)")
def _nan(s):
    return [], [nan_nifti(s)]


@_case("a palette (indexed-colour) PNG", "train", "is a palette image")
def _palette(s):
    path = s.file("training", 3)
    Image.open(path).convert("P").save(path)
    return [], [path]


@_case("a validation image smaller than the network takes (40 px)", "train", "the network needs at least 40")
def _too_small(s):
    for key in ("image", "mask"):
        path = s.file("validation", 0, key)
        Image.open(path).resize((30, 64)).save(path)
    return [], [s.file("validation", 0)]


@_case("a mask of another size than its image", "train", "they must match pixel for pixel")
def _mask_size(s):
    path = s.file("validation", 1, "mask")
    Image.open(path).resize((60, 64)).save(path)
    return [], [path, s.file("validation", 1)]


@_case("a folder where an image should be", "train", "is a folder, not an image file")
def _folder(s):
    folder = s.data / "training_9.png"
    folder.mkdir()
    s.set_item("training", 0, image=folder.name)
    return [], [folder]


@_case("an image file that does not exist", "train", "does not exist")
def _missing(s):
    s.set_item("training", 2, image="gone.png")
    return [], [s.data / "gone.png"]


# --- datalists --------------------------------------------------------------------------------------------------------


@_case("a training item without a label", "train", "has no 'label'")
def _no_label(s):
    s.drop_key("training", 1, "label")
    return [], [s.file("training", 1)]


@_case("a validation item without a mask", "train", "has no 'mask'")
def _no_mask(s):
    s.drop_key("validation", 0, "mask")
    return [], [s.file("validation", 0)]


@_case('an image given as a number ("image": 123)', "train", "must be a file path")
def _image_number(s):
    s.set_item("training", 0, image=123)
    return [], [s.data / "datalist.json"]


@_case("a label outside the classes", "train", "has label 2, not a class index in [0, 2)")
def _label_range(s):
    s.set_item("training", 3, label=2)
    return [], [s.file("training", 3)]


@_case('a label given as text ("malignant")', "train", "it must be a class index")
def _label_text(s):
    s.set_item("validation", 1, label="malignant")
    return [], [s.file("validation", 1)]


@_case("an empty split", "train", "is empty: a MONAI datalist needs image entries")
def _empty_split(s):
    content = s.datalist()
    content["validation"] = []
    s.write_datalist(content)
    return [], [s.data / "datalist.json"]


@_case("a dataset folder without datalist.json", "train", "scripts/prepare_glas.py")
def _no_datalist(s):
    (s.data / "datalist.json").unlink()
    return [], [s.data / "datalist.json"]


# --- settings and output folders --------------------------------------------------------------------------------------


@_case("resize_short_side smaller than crop_size", "train", "crop_size 48 is larger than resize_short_side 40")
def _crop(s):
    return ["--resize_short_side", "40"], [s.data / "datalist.json"]


@_case("a models folder that cannot be written", "train", "is not writable")
def _unwritable(s):
    blocked = s.work / "blocked"
    blocked.write_text("a file where the models folder should be")
    return ["--ckpt_dir", str(blocked)], [blocked]


@_case("two images of an inference folder with the same name but the extension", "infer", "would both be written")
def _same_stem(s):
    folder = s.folder_of_images("x.png")
    Image.open(folder / "x.png").save(folder / "x.bmp")
    return ["--dataset_dir", str(folder)], [folder / "x.bmp", folder / "x.png"]


# --- checkpoints ------------------------------------------------------------------------------------------------------


@_case("evaluating without a trained model", "evaluate", "does not exist: train the bundle first")
def _no_checkpoint(s):
    return ["--checkpoint", str(s.work / "model.pt")], [s.work / "model.pt"]


@_case("a truncated checkpoint", "evaluate", "cannot be read as a PyTorch checkpoint")
def _truncated_checkpoint(s):
    return ["--checkpoint", str(truncated(s.checkpoint(maxmin_lite0())))], [s.work / "other.pt"]


@_case("a file that is not a checkpoint", "infer", "cannot be read as a PyTorch checkpoint")
def _not_checkpoint(s):
    path = s.work / "notes.pt"
    path.write_text("not a model")
    return ["--checkpoint", str(path)], [path]


@_case("a checkpoint of another method (CAM) for max-min", "evaluate", "holds a CAMClassifier (efficientnet-lite0")
def _other_method(s):
    from monai_wsl.networks import CAMClassifier

    path = s.checkpoint(CAMClassifier(encoder="efficientnet-lite0"))
    return ["--checkpoint", str(path)], [path]


@_case("a checkpoint with NaN weights", "infer", "tensor(s) with NaN or Inf")
def _nan_checkpoint(s):
    net = maxmin_lite0()
    with torch.no_grad():
        net.localizer_head.conv.weight[0, 0] = float("nan")
    path = s.checkpoint(net)
    return ["--checkpoint", str(path)], [path]


# --- GlaS folders -----------------------------------------------------------------------------------------------------


@_case("a split file whose label contradicts Grade.csv", "prepare_glas", "Grade.csv grades it benign (0)")
def _split_label(s):
    from tests.test_glas_data import make_glas_folder

    glas = s.work / "GlaS"
    make_glas_folder(glas, tests=False)  # train_1 is benign
    (glas / "splits").mkdir()
    (glas / "splits" / "fold0_train.csv").write_text("name,label\ntrain_1,1\ntrain_3,0\n")
    (glas / "splits" / "fold0_valid.csv").write_text("name,label\ntrain_2,0\n")
    return ["--src", str(glas), "--out", str(s.work / "datalist.json")], [glas / "splits" / "fold0_train.csv"]


def command(kind: str, scene: Scene, extra: list[str]) -> list[str]:
    if kind == "prepare_glas":
        return [sys.executable, str(REPO / "scripts" / "prepare_glas.py"), *extra]
    configs = {
        "train": ["train.json"],
        "evaluate": ["train.json", "evaluate.json"],
        "infer": ["inference.json"],
    }[kind]
    files = "[" + ",".join(f"'{CONFIGS / c}'" for c in configs) + "]"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", files, "--bundle_root", str(scene.root)]
    cmd += ["--meta_file", str(CONFIGS / "metadata.json"), "--logging_file", str(CONFIGS / "logging.conf")]
    cmd += ["--dataset_dir", str(scene.data)] + (SETTINGS if kind != "infer" else ["--num_workers", "0"])
    if kind in ("evaluate", "infer") and "--checkpoint" not in extra:
        cmd += ["--checkpoint", str(scene.root / "models" / "model.pt")]
    return cmd + extra


@pytest.fixture(scope="module")
def clean_data(tmp_path_factory) -> Path:
    from monai_wsl.data import write_synthetic_histology

    return write_synthetic_histology(tmp_path_factory.mktemp("data"), 4, 2, (64, 64), seed=0).parent


def make_scene(folder: Path, clean_data: Path) -> Scene:
    root, data, work = folder / "bundle", folder / "data", folder / "work"
    shutil.copytree(clean_data, data)
    work.mkdir()
    (root / "models").mkdir(parents=True)
    torch.save(maxmin_lite0().state_dict(), root / "models" / "model.pt")  # an earlier run's selected model
    return Scene(root, data, work)


@pytest.fixture
def scene(tmp_path, clean_data) -> Scene:
    return make_scene(tmp_path, clean_data)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


#: the rarer formats and datalist mistakes, run with `pytest -m slow` (each case is a bundle process of its own)
SLOW_CASES = {
    "a 16-bit RGB TIFF (ITK cannot load it)",
    "a floating-point TIFF",
    "a TIFF with 5 channels",
    "an image with a NaN patch",
    "a palette (indexed-colour) PNG",
    "a mask of another size than its image",
    "a validation item without a mask",
    'an image given as a number ("image": 123)',
    "a label outside the classes",
    'a label given as text ("malignant")',
    "an empty split",
    "resize_short_side smaller than crop_size",
    "a truncated checkpoint",
    "a checkpoint with NaN weights",
}
FAST = [c for c in CASES if c.title not in SLOW_CASES]
SLOW = [c for c in CASES if c.title in SLOW_CASES]


def run_cases(tmp_path_factory, clean_data, cases: list[Case]) -> dict[str, tuple]:
    """Every case run once, two at a time (each is a separate Python process: the cores are the limit)."""

    def run(case: Case) -> tuple:
        scene = make_scene(tmp_path_factory.mktemp(case.setup.__name__.strip("_")), clean_data)
        extra, files = case.setup(scene)
        model = scene.root / "models" / "model.pt"
        before = sha256(model)
        done = subprocess.run(command(case.kind, scene, extra), capture_output=True, text=True, timeout=300, cwd=REPO)
        trained = any(scene.root.glob("models/checkpoint_epoch=*.pt"))
        return done.returncode, done.stdout + done.stderr, files, sha256(model) == before, trained

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip([c.title for c in cases], pool.map(run, cases)))


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory, clean_data) -> dict[str, tuple]:
    return run_cases(tmp_path_factory, clean_data, FAST)


@pytest.fixture(scope="module")
def slow_outcomes(tmp_path_factory, clean_data) -> dict[str, tuple]:
    return run_cases(tmp_path_factory, clean_data, SLOW)


def check_outcome(case: Case, outcome: tuple) -> None:
    returncode, output, files, model_unchanged, trained = outcome
    assert returncode == 1, output[-3000:]
    assert case.says in output, output[-3000:]
    for file in files:
        assert str(file) in output, (str(file), output[-3000:])
    assert model_unchanged  # the earlier run's model.pt is untouched
    assert not trained  # nothing was trained


@pytest.mark.parametrize("case", FAST, ids=[c.setup.__name__.strip("_") for c in FAST])
def test_bad_input_stops_with_a_message_that_names_the_file(case, outcomes):
    check_outcome(case, outcomes[case.title])


@pytest.mark.slow
@pytest.mark.parametrize("case", SLOW, ids=[c.setup.__name__.strip("_") for c in SLOW])
def test_more_bad_input_stops_with_a_message_that_names_the_file(case, slow_outcomes):
    check_outcome(case, slow_outcomes[case.title])


def test_grey_and_rgba_images_are_converted_with_a_warning(scene):
    """Not every odd file is an error: grey, grey + alpha, RGBA and 16-bit grey images are converted (and logged)."""
    from monai.bundle import ConfigWorkflow

    grey = scene.file("training", 0)
    Image.open(grey).convert("L").save(grey)
    rgba = scene.file("training", 1)
    Image.open(rgba).convert("RGBA").save(rgba)
    wf = ConfigWorkflow(
        config_file=str(CONFIGS / "train.json"),
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=str(CONFIGS / "logging.conf"),
        workflow_type="train",
        bundle_root=str(scene.root),
        dataset_dir=str(scene.data),
        resize_short_side=64,
        crop_size=48,
        num_workers=0,
        **{"network_def#pretrained": False},
    )
    wf.initialize()  # the pre-flight check passes
    dataset = wf.parser.get_parsed_content("train#dataset")
    assert all(tuple(dataset[i]["image"].shape) == (3, 48, 48) for i in range(2))


def render_table(cases: list[Case]) -> str:
    """The docs/reliability.md table of ``cases``."""
    rows = ["| input | command | stops with (exit code 1; the message names the file) |", "|---|---|---|"]
    kinds = {
        "train": "train",
        "evaluate": "evaluate",
        "infer": "inference",
        "prepare_glas": "`scripts/prepare_glas.py`",
    }
    rows += [f"| {c.title} | {kinds[c.kind]} | `{c.says}` |" for c in cases]
    return "\n".join(rows)


BEGIN, END = "<!-- table generated by tests/test_reliability.py -->", "<!-- end of the generated table -->"


def test_reliability_doc_is_the_case_table():
    text = DOC.read_text()
    table = text[text.index(BEGIN) + len(BEGIN) : text.index(END)].strip()
    assert table == render_table(CASES), "docs/reliability.md is stale: run python tests/test_reliability.py"


if __name__ == "__main__":
    text = DOC.read_text()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    DOC.write_text(text[:start] + "\n" + render_table(CASES) + "\n" + text[end:])
    print(f"wrote the table of {len(CASES)} cases into {DOC}")


@pytest.mark.slow
def test_a_kill_while_a_checkpoint_is_written_loses_nothing(tmp_path, clean_data):
    """SIGKILL in the middle of writing checkpoint_epoch=2.pt: the epoch 1 checkpoint is intact, resume continues from
    it, and the final weights and selected model equal an uninterrupted run's, bit for bit (same thread count)."""
    import os
    import signal
    import time

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    base = command("train", Scene(tmp_path / "x", clean_data, tmp_path), ["--max_epochs", "3"])

    def train(root: Path, *extra: str) -> list[str]:
        cmd = list(base)
        cmd[cmd.index("--bundle_root") + 1] = str(root)
        return cmd + list(extra)

    whole = subprocess.run(train(tmp_path / "whole"), env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0, whole.stdout[-2000:] + whole.stderr[-2000:]

    marker, killed = tmp_path / "writing", tmp_path / "killed"
    probe = ["--checkpointing#1#_target_", "tests.bundle_probes.PausingSaver"]
    probe += ["--checkpointing#1#pause_epoch", "2", "--checkpointing#1#marker", str(marker)]
    process = subprocess.Popen(
        train(killed, *probe), env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 300
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert marker.exists(), process.stderr.read().decode()[-2000:] if process.poll() is not None else "no save seen"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    models = killed / "models"
    assert (models / "checkpoint_epoch=1.pt").is_file() and not (models / "checkpoint_epoch=2.pt").exists()
    assert list(models.glob(".checkpoint_epoch=2.pt.*.partial"))  # killed in the middle of that write

    resumed = subprocess.run(
        train(killed, "--resume", "true"), env=env, cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert "resume: continuing from" in resumed.stdout + resumed.stderr
    assert not list(models.glob("*.partial"))  # the stale partial file is cleaned up by the next save of that name
    for name in ("checkpoint_epoch=3.pt", "model.pt"):
        a = torch.load(tmp_path / "whole" / "models" / name, weights_only=True)
        b = torch.load(models / name, weights_only=True)
        a, b = a.get("model", a), b.get("model", b)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_a_data_error_from_a_worker_process_keeps_its_message():
    """Worker processes (prepare_camelyon16.py --workers) send their exceptions back pickled: the problems come back
    whole, not one per character."""
    import pickle

    from monai_wsl.data import DataError

    error = pickle.loads(pickle.dumps(DataError(["slide a.tif: cannot be read: fix it"], "the slides")))
    assert error.problems == ["slide a.tif: cannot be read: fix it"]
    assert str(error) == "1 problem(s) in the slides; nothing was run:\n  - slide a.tif: cannot be read: fix it"


def test_the_check_reads_files_in_threads_and_reports_in_datalist_order(tmp_path, capsys, monkeypatch):
    """The pre-flight check decodes every file whole, in threads: the problems come in the datalist's order whatever
    thread finished first, the same as with one thread, and a progress bar shows for a large datalist."""
    from monai_wsl.data import DataError, check, check_run

    rng = np.random.default_rng(0)
    items = []
    for i in range(40):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        Image.fromarray((rng.random((64, 64)) > 0.5).astype(np.uint8) * 255).save(tmp_path / f"{i}_mask.png")
        items.append({"image": f"{i}.png", "label": i % 2, "mask": f"{i}_mask.png"})
    (tmp_path / "7.png").write_bytes((tmp_path / "7.png").read_bytes()[:300])  # truncated
    (tmp_path / "21_mask.png").unlink()
    Image.fromarray(np.zeros((32, 64), np.uint8)).save(tmp_path / "33_mask.png")  # another size than its image
    items[38]["label"] = 5
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": items[:20], "validation": items[20:]}))

    def problems(**kwargs) -> list[str]:
        with pytest.raises(DataError) as e:
            check_run(datalist, {"training": False, "validation": True}, **kwargs)
        return e.value.problems

    threaded = problems(num_threads=4)
    assert threaded == problems(num_threads=1)
    where = [p.split(" ", 1)[0].rstrip(":") for p in threaded]
    assert where == ["training[7]", "validation[1]", "validation[13]", "validation[18]"], threaded
    assert "7.png" in threaded[0] and "cannot be read" in threaded[0]
    assert "21_mask.png does not exist" in threaded[1] and "33_mask.png" in threaded[2] and "label 5" in threaded[3]
    capsys.readouterr()
    monkeypatch.setattr(check, "PROGRESS_ABOVE", 10)
    problems(num_threads=2)
    assert "checking the data" in capsys.readouterr().err
