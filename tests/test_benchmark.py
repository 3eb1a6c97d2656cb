"""scripts/benchmark.py: the end-to-end split of an epoch (Ignite's HandlersTimeProfiler on the trainer and on the
validation evaluator, BasicTimeProfiler there) and the recipe run it reports on."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
from ignite.engine import Engine, Events

from tests.scripts import load_script

REPO = Path(__file__).resolve().parents[1]


def load_benchmark():
    return load_script("benchmark")


def test_epoch_split_counts_each_validation_once():
    """Training steps of 20 ms, 3 validation iterations of 10 ms and a 30 ms metric-like handler per epoch: every
    epoch gets the same split (the evaluator runs once per epoch; its profiler must not count earlier runs again; the
    metric-like handler counts among the end-of-epoch handlers)."""
    benchmark = load_benchmark()
    evaluator = Engine(lambda e, b: time.sleep(0.01))

    class SlowMetric:
        def __call__(self, engine):
            time.sleep(0.03)

    evaluator.add_event_handler(Events.EPOCH_COMPLETED, SlowMetric())
    trainer = Engine(lambda e, b: time.sleep(0.02))
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: evaluator.run([0, 1, 2]))
    split = benchmark.EpochSplit(trainer, evaluator)
    trainer.run([0, 1], max_epochs=3)
    split.finish()
    rows = split.rows()
    assert len(rows) == 3 and len(split.evaluator_profiler.processing_times) == 3  # the last run's 3 iterations
    for row in rows:
        assert row["steps"] == pytest.approx(0.04, abs=0.015)
        assert row["val_forward"] == pytest.approx(0.03, abs=0.015)
        assert row["val_end_handlers"] == pytest.approx(0.03, abs=0.015)  # at EPOCH_COMPLETED
        parts = sum(v for k, v in row.items() if k != "total")
        assert parts == pytest.approx(row["total"]) and row["other_handlers"] >= -1e-3


def test_recipe_run_reports_the_split_and_the_pure_compute(tmp_path):
    benchmark = load_benchmark()
    small = {"synthetic_data": {"num_train": 8, "num_valid": 4, "size": [96, 96], "seed": 0}}
    small.update(resize_short_side=80, crop_size=64, num_workers=0)
    r = benchmark.run_recipe("quick_start", 2, tmp_path, small)
    assert len(r["epochs"]) == 2 and r["recipe_epochs"] == 12  # train.json's quick start
    assert all(row["steps"] > 0 and row["val_forward"] > 0 and row["total"] > 0 for row in r["epochs"])
    assert r["pure_compute"]["steps"] > 0 and r["pure_compute"]["validation"] > 0
    assert r["mean_epoch"] == r["epochs"][1]  # epoch 1 (caches) left out of the mean
    startup = r["run_seconds"] - r["epochs"][1]["total"]
    assert r["recipe_minutes"] * 60 == pytest.approx(startup + 11 * r["epochs"][1]["total"])


def test_map_profile_scores_the_border_band_apart_and_runs_the_model_with_its_padding(tmp_path):
    """scripts/map_profile.py: one value per row and column of the encoder's grid, the border band and the interior
    together cover every pixel of the validation images, and the padding comes from the model card (the same weights
    with edge replication give another profile)."""
    import json
    import subprocess

    import torch

    from monai_wsl.data import write_synthetic_histology
    from monai_wsl.handlers import MODEL_CARD
    from monai_wsl.networks import MaxMinUncertaintyNet

    datalist = write_synthetic_histology(tmp_path / "data", num_train=2, num_valid=3, size=(256, 224), seed=0)
    torch.manual_seed(0)
    torch.save(MaxMinUncertaintyNet(encoder="efficientnet-lite0").state_dict(), tmp_path / "model.pt")

    def profile(name: str) -> dict:
        out = tmp_path / f"{name}.json"
        command = [sys.executable, str(REPO / "scripts" / "map_profile.py"), "--checkpoint", str(tmp_path / "model.pt")]
        command += ["--datalist", str(datalist), "--crop", "192", "160", "--shift", "32", "--band", "32"]
        subprocess.run([*command, "--json", str(out)], check=True, capture_output=True, text=True)
        return json.loads(out.read_text())

    zeros = profile("zeros")
    assert zeros["padding_mode"] == "zeros" and zeros["images"] == 3
    assert len(zeros["rows"]) == len(zeros["rows_shifted"]) == 6 and len(zeros["columns"]) == 5
    regions = zeros["regions"]
    assert regions["band"]["pixels"] == 3 * (256 * 224 - 192 * 160)
    assert regions["interior"]["pixels"] == 3 * 192 * 160
    assert all(0 <= regions[r][k] <= 1 for r in regions for k in ("pxap", "f1_pos", "f1_neg"))
    (tmp_path / MODEL_CARD).write_text(json.dumps({"trained_on": {"padding_mode": "replicate"}}))
    replicate = profile("replicate")
    assert replicate["padding_mode"] == "replicate" and replicate["rows"] != zeros["rows"]


@pytest.mark.slow  # two backends over a slide, the ONNX export included: about a minute on 2 cores
def test_wsi_run_times_each_backend_on_the_same_patches_and_splits_the_time(tmp_path):
    """--wsi: both backends run the same tissue patches of a slide; the whole path's time is split into the plan, the
    reading, the network and the rest, which add up to it."""
    import argparse

    from monai_wsl.data import write_synthetic_slide

    benchmark = load_benchmark()
    slide = tmp_path / "slide.tif"
    write_synthetic_slide(slide, 2, 3, tile=128, seed=0)
    args = argparse.Namespace(
        wsi=str(slide), encoder="efficientnet-lite0", device="cpu", checkpoint=None, out=str(tmp_path / "out"),
        inference_backend="torch,onnxruntime", size=128, overlap=0.0, level=0, batch=4, num_workers=0, amp=False,
        merger="auto", repeats=1,
    )  # fmt: skip
    r = benchmark.run_wsi(args)
    assert set(r["backends"]) == {"torch", "onnxruntime"} and 0 < r["patches_run"] <= r["patches_total"]
    for row in r["backends"].values():
        split = row["split_s"]
        assert split["plan"] > 0 and split["read"] > 0 and split["forward"] > 0
        assert sum(split.values()) == pytest.approx(min(row["whole_path_s"]))
        assert row["whole_path_patches_per_s"] == pytest.approx(r["patches_run"] / min(row["whole_path_s"]))


@pytest.mark.slow  # scripts/device_study.sh run --quick: about 2 minutes on 2 cores
def test_the_prepared_device_study_runs_its_steps_small_and_sums_them_up(tmp_path, shared_data):
    """The one prepared GPU call, in its small CPU form: each step leaves its figures in OUT, and the summary's slides
    per hour is one hour over the synthetic slide's best whole-path time."""
    import json
    import os
    import subprocess

    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "OUT": str(out), "WORK": str(work), "PYTHON": sys.executable, "OMP_NUM_THREADS": "2"}
    result = subprocess.run(
        ["bash", str(REPO / "scripts" / "device_study.sh"), "run", "--quick"], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert {"step", "recipe", "slide", "wsi"} <= set(summary) and "torch" in (out / "device.txt").read_text()
    assert summary["steps_failed"] == 0
    step, recipe, wsi = summary["step"], summary["recipe"], summary["wsi"]
    assert step["input"] == [4, 3, 64, 64] and step["maxmin_images_per_s"] > 0
    assert step["time_ratio"] == pytest.approx(step["plain_images_per_s"] / step["maxmin_images_per_s"])
    assert len(recipe["epochs"]) == 1 and recipe["recipe_epochs"] == 80  # the GlaS recipe's 80, extrapolated
    assert summary["slide"]["rows"] == 6 and (work / "slide_6x128.tif").is_file()
    assert 0 < wsi["patches_run"] <= 36 and wsi["patch_size"] == 128
    per_hour = summary["slides_per_hour"]
    assert per_hour["slides_per_hour"] == pytest.approx(3600 / min(wsi["whole_path_s"]))
    # a step out of time counts as failed (the exit status), and a mistyped argument runs nothing
    rerun = subprocess.run(
        ["bash", str(REPO / "scripts" / "device_study.sh"), "run", "--quick"],
        env={**env, "DEADLINE": "0"}, capture_output=True, text=True,
    )  # fmt: skip
    assert rerun.returncode == 3 and json.loads((out / "summary.json").read_text())["steps_failed"] == 3
    assert not (out / "step.json").exists()  # the earlier run's figures are not summed up as this one's
    typo = subprocess.run(["bash", str(REPO / "scripts" / "device_study.sh"), "run", "--quik"], capture_output=True)
    assert typo.returncode == 2 and b"usage" in typo.stderr


def test_overrides_read_values_as_the_bundle_command_line_does():
    """``--override num_workers=0`` must reach the DataLoader as the integer 0 (a string stops it), ``true`` as a
    bool, and a torch expression or a word as the string given."""
    read = load_benchmark()._override
    assert read("num_workers=0") == ("num_workers", 0)
    assert read("fold_padding=true") == ("fold_padding", True)
    assert read("memory_format=$torch.channels_last") == ("memory_format", "$torch.channels_last")
    assert read("fold_padding=auto") == ("fold_padding", "auto")
    assert read("lr=3e-3") == ("lr", 3e-3)
    with pytest.raises(SystemExit, match="id=value"):
        read("num_workers")
