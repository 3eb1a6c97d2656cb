"""scripts/report.py regenerates the comparison table and figure from saved evaluations."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.scripts import load_script

REPO = Path(__file__).resolve().parents[1]


def load_report():
    """scripts/report.py as a module (it imports its sibling scripts/bundle_runner.py, as when run as a script)."""
    return load_script("report")


def summary(accuracy, f1_pos, f1_neg, pxap):
    return {"images": 2, "val_accuracy": accuracy, "val_f1_pos": f1_pos, "val_f1_neg": f1_neg,
            "val_iou_pos": 0.5, "val_iou_neg": 0.4, "val_pxap": pxap, "val_fpr": 0.3}  # fmt: skip


@pytest.fixture
def saved(tmp_path):
    """Two validation images with masks, and saved evaluations: max-min with 2 seeds (summary.json, as evaluations
    made before MONAI's MetricsSaver), CAM with 1 (metrics.csv, as MetricsSaver writes it)."""
    items = []
    for i, fg in enumerate((0.25, 0.5)):
        image, mask = tmp_path / f"img{i}.png", tmp_path / f"img{i}_anno.png"
        Image.fromarray(np.full((8, 10, 3), 100, dtype=np.uint8)).save(image)
        m = np.zeros((8, 10), dtype=np.uint8)
        m[: int(8 * fg)] = 255
        Image.fromarray(m).save(mask)
        items.append({"image": str(image), "label": i, "mask": str(mask)})
    (tmp_path / "datalist.json").write_text(json.dumps({"training": [], "validation": items}))
    runs = {("maxmin_sem", 0): summary(1.0, 0.70, 0.60, 0.80), ("maxmin_sem", 1): summary(0.5, 0.60, 0.70, 0.70)}
    runs[("cam", 0)] = summary(1.0, 0.66, 0.20, 0.50)
    for (name, seed), content in runs.items():
        folder = tmp_path / name / f"seed{seed}" / "eval_validation"
        (folder / "masks").mkdir(parents=True)
        if name == "cam":
            lines = [f"{k},{v}" for k, v in content.items() if k != "images"]
            (folder / "metrics.csv").write_text("\n".join(lines) + "\n")
        else:
            (folder / "summary.json").write_text(json.dumps(content))
        for i in range(2):
            Image.fromarray(np.full((8, 10), 255 * (name == "cam"), dtype=np.uint8)).save(
                folder / "masks" / f"img{i}_mask.png"
            )
    (tmp_path / "maxmin_sem" / "seed0" / "train_time.json").write_text(json.dumps({"seconds": 120}))
    return tmp_path


def test_table_from_saved_evaluations(saved):
    report = load_report()
    text = report.table(saved, "validation", report.RUNS)
    rows = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines() if line.startswith("| ")}
    # mean +- sample std over the two seeds; classification error in %
    assert "| 25.00 +- 35.36 | 65.00 +- 7.07 | 65.00 +- 7.07 |" in rows["Max-min (SEM), ours"]
    assert rows["Max-min (SEM), ours"].endswith("| 2 | 2.0 |")
    assert "| 0.00 | 66.00 | 20.00 |" in rows["CAM (GAP)"]
    # the full max-min run is reused as the FG + BG + ASC row of the ablation and the paper's lambda
    assert rows["FG + BG (SEM) + ASC"].split(" | ")[1:] == rows["Max-min (SEM), ours"].split(" | ")[1:]
    assert "lambda = 1e-7 (paper)" in rows and "Grad-CAM" not in rows  # no evaluation of Grad-CAM was saved
    # the all-ones mask on the two images: F1+ = mean(2|G| / (N + |G|)), PxAP = pooled foreground share
    f1 = np.mean([2 * 20 / (80 + 20), 2 * 40 / (80 + 40)])
    assert f"| {100 * f1:.2f} | 0.00 |" in rows["All-ones mask (reference)"]
    assert f"| {100 * 60 / 160:.2f} | 100.00 |" in rows["All-ones mask (reference)"]
    # the all-zeros mask: F1- = mean(2|B| / (N + |B|)) with |B| the background, FPR 0
    f1_neg = np.mean([2 * 60 / (80 + 60), 2 * 40 / (80 + 40)])
    assert f"| 0.00 | {100 * f1_neg:.2f} |" in rows["All-zeros mask (reference)"]
    assert rows["All-zeros mask (reference)"].endswith("| 0.00 | - | - |")


def test_figure_has_a_column_per_method(saved):
    report = load_report()
    path = report.figure(saved, "validation", report.RUNS, 2, saved / "fig.png")
    picture = np.array(Image.open(path))
    # header + 2 rows of 180-pixel tiles; image, ground truth, max-min SEM and CAM columns (4 tiles of 225 + gaps)
    assert picture.shape[0] == 22 + 2 * (180 + 4)
    assert picture.shape[1] == 4 * 225 + 3 * 4


def test_figure_shows_each_methods_lowest_evaluated_seed(saved):
    """A sweep that ran only later seeds (e.g. --seeds 1 2 on a fresh GPU machine) still gets every method's column."""
    report = load_report()
    masks1 = saved / "maxmin_sem" / "seed1" / "eval_validation" / "masks"
    for mask in masks1.glob("*_mask.png"):  # seed 1 marks the whole image, seed 0 nothing
        Image.fromarray(np.full((8, 10), 255, dtype=np.uint8)).save(mask)
    centre = (22 + 90, 2 * (225 + 4) + 112)  # a pixel in the middle of the max-min column's first tile

    def maxmin_pixel():
        picture = np.array(Image.open(report.figure(saved, "validation", report.RUNS, 2, saved / "fig.png")))
        assert picture.shape[1] == 4 * 225 + 3 * 4
        return picture[centre].astype(int)

    assert (maxmin_pixel() == 100).all()  # seed 0 first: its empty mask leaves the grey image untinted
    for mask in (saved / "maxmin_sem" / "seed0" / "eval_validation" / "masks").glob("*_mask.png"):
        mask.unlink()
    assert maxmin_pixel()[2] > 140  # now seed 1's mask: the tile is tinted teal


def test_figure_columns_stay_aligned_across_aspect_ratios(saved):
    """A wider image must not shift the columns of the other rows: every panel has the same cell, narrower ones are
    centred in it with white margins."""
    report = load_report()
    Image.fromarray(np.full((8, 16, 3), 100, dtype=np.uint8)).save(saved / "img1.png")  # 2:1 instead of 5:4
    Image.fromarray(np.zeros((8, 16), dtype=np.uint8)).save(saved / "img1_anno.png")
    for name in ("maxmin_sem", "cam"):
        mask = np.full((8, 16), 255 * (name == "cam"), dtype=np.uint8)
        Image.fromarray(mask).save(saved / name / "seed0" / "eval_validation" / "masks" / "img1_mask.png")
    picture = np.array(Image.open(report.figure(saved, "validation", report.RUNS, 2, saved / "fig.png")))
    cell, gap, tile = 360, 4, 180
    assert picture.shape[1] == 4 * cell + 3 * gap
    top, bottom = 22 + tile // 2, 22 + tile + gap + tile // 2  # a pixel row through each image row
    for k in range(4):
        left = k * (cell + gap)
        assert (picture[top, left + 10] == 255).all()  # margin beside the 225-pixel-wide panel of the 5:4 image
        assert (picture[top, left + cell // 2] != 255).any() and (picture[bottom, left + 10] != 255).any()
        assert (picture[top, left + (cell - 225) // 2 + 1] != 255).any()  # the narrow panel is centred


def test_table_still_regenerates_when_the_data_moved(saved, capsys):
    """The table comes from the saved evaluations; only the reference rows and the figure need the images."""
    report = load_report()
    (saved / "img1_anno.png").unlink()
    text = report.table(saved, "validation", report.RUNS)
    assert "| Max-min (SEM), ours |" in text and "All-ones mask" not in text
    assert report.figure(saved, "validation", report.RUNS, 2, saved / "fig.png") is None
    err = capsys.readouterr().err
    assert "img1_anno.png" in err and "datalist.json" in err


@pytest.mark.slow
def test_paper_protocol_end_to_end_on_a_full_release(tmp_path):
    """prepare, train, select, test: one command on a GlaS-like release folder with testA / testB."""
    import subprocess

    from monai_wsl.data import synthetic_histology_sample

    release = tmp_path / "release"
    release.mkdir()
    rng = np.random.default_rng(0)
    rows = ["name,patient ID, grade (GlaS), grade (Sirinukunwattana et al. 2015)"]
    names = [f"train_{i}" for i in range(1, 9)] + ["testA_1", "testA_2", "testB_1", "testB_2"]
    for k, name in enumerate(names):
        label = k % 2
        image, mask = synthetic_histology_sample(label, (96, 96), rng)
        Image.fromarray(image).save(release / f"{name}.bmp")
        Image.fromarray((mask * (1 + k % 3)).astype(np.uint8)).save(release / f"{name}_anno.bmp")  # instance ids
        rows.append(f"{name},{k}, {('benign', 'malignant')[label]}, x")
    (release / "Grade.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "runs"
    cmd = [sys.executable, str(REPO / "scripts" / "report.py"), "--src", str(release), "--out", str(out), "--run",
           "--eval-split", "test", "--groups", "methods", "--runs", "maxmin_sem,gradcam", "--max-epochs", "1",
           "--crop-size", "64", "--resize-short-side", "80", "--num-workers", "0", "--jobs", "2"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "| Max-min (SEM), ours |" in done.stdout and "| All-ones mask (reference) |" in done.stdout
    # two trainings side by side (max-min and the CAM model), then Grad-CAM over the trained CAM model
    assert "| Grad-CAM |" in done.stdout and "| CAM (GAP) |" not in done.stdout  # cam trained, not asked for
    gradcam = out / "gradcam" / "seed0" / "eval_test"
    assert len((gradcam / "predictions.csv").read_text().splitlines()) == 4 and (gradcam / "metrics.csv").is_file()
    assert "Trained on: " in (out / "table_test.md").read_text()
    maxmin = (out / "maxmin_sem" / "seed0" / "eval_test" / "predictions.csv").read_text().splitlines()
    assert sorted(Path(line.split(",")[0]).stem for line in maxmin) == ["testA_1", "testA_2", "testB_1", "testB_2"]
    datalist = json.loads((out / "datalist.json").read_text())
    assert len(datalist["training"]) + len(datalist["validation"]) == 8
    assert (out / "maxmin_sem" / "seed0" / "models" / "model.pt").is_file()  # selected on validation
    assert (out / "table_test.md").read_text().count("| Max-min (SEM), ours |") == 1


def test_help_shows_each_documented_command_as_written():
    """The module docstring is the ``--help`` text: its commands keep their line breaks and parse as given."""
    report = load_report()
    text = report.build_parser().format_help()
    assert max(len(line) for line in text.splitlines()) <= 120, "a documented command lost its line break"
    commands = report.__doc__.replace("\\\n", " ").splitlines()
    commands = [line.split("report.py", 1)[1].split() for line in commands if "python scripts/report.py" in line]
    assert len(commands) >= 4
    for argv in commands:
        args = report.build_parser().parse_args(argv)
        assert args.out


def test_jobs_side_by_side_share_the_cores(monkeypatch, tmp_path):
    """``--jobs N``: each bundle run gets cores // N CPU threads (not all of them), unless the user chose a number."""
    report = load_report()
    runner = report.sys.modules["bundle_runner"]
    monkeypatch.setattr(runner, "usable_cpus", lambda: 16)
    assert runner.job_environment(7, {})["OMP_NUM_THREADS"] == "2"
    assert runner.job_environment(32, {})["OMP_NUM_THREADS"] == "1"
    assert "OMP_NUM_THREADS" not in runner.job_environment(1, {})  # one run alone keeps PyTorch's default
    assert runner.job_environment(7, {"OMP_NUM_THREADS": "4"})["OMP_NUM_THREADS"] == "4"

    seen = {}

    def fake_run(cmd, env=None, **kwargs):
        seen.update(env=env, cmd=cmd)
        return type("Done", (), {"returncode": 0})()

    monkeypatch.setattr(runner.subprocess, "run", fake_run)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    runner.run_bundle(["train.json", "methods/cam.json"], {"seed": 1}, tmp_path / "log", runner.job_environment(8))
    assert seen["env"]["OMP_NUM_THREADS"] == "2" and seen["env"]["PATH"] == runner.os.environ["PATH"]
    configs = seen["cmd"][seen["cmd"].index("--config_file") + 1]
    assert configs == f"['{runner.CONFIGS / 'train.json'}','{runner.CONFIGS / 'methods' / 'cam.json'}']"
    assert seen["cmd"][-2:] == ["--seed", "1"]


def test_jobs_below_one_is_refused(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "report.py"), "--out", str(tmp_path), "--jobs", "0"],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 2 and "--jobs 0" in done.stderr and "1 or more" in done.stderr


def test_every_run_names_existing_config_files():
    report = load_report()
    for run in report.RUNS:
        for config in run.configs:
            assert (REPO / "bundle" / "configs" / config).is_file(), (run.name, config)


def test_training_order_is_seed_major_with_each_dependent_after_its_model():
    """A sweep stopped part-way keeps whole tables of its first seeds; Grad-CAM runs in the CAM training's chain."""
    report = load_report()
    by_name = {r.name: r for r in report.RUNS}
    runs = [by_name[n] for n in ("maxmin_sem", "gradcam", "gradcampp", "wildcat", "cam")]
    order = [[str(job) for job in chain] for chain in report.training_order(runs, [0, 1])]
    assert order == [
        ["maxmin_sem seed 0"], ["wildcat seed 0"], ["cam seed 0", "gradcam seed 0", "gradcampp seed 0"],
        ["maxmin_sem seed 1"], ["wildcat seed 1"], ["cam seed 1", "gradcam seed 1", "gradcampp seed 1"],
    ]  # fmt: skip
    # Grad-CAM alone (its CAM model trained earlier): one chain per seed, nothing trained
    order = report.training_order([by_name["gradcam"]], [0, 2])
    assert [[str(job) for job in chain] for chain in order] == [["gradcam seed 0"], ["gradcam seed 2"]]


def test_a_failed_training_skips_the_evaluations_of_its_model(monkeypatch, tmp_path, capsys):
    report = load_report()
    calls = []

    def fake_bundle(configs, overrides, log, env=None):
        calls.append((Path(overrides["bundle_root"]).parent.name, tuple(configs)))
        if "methods/cam.json" in configs and "evaluate.json" not in configs:
            raise RuntimeError("bundle run failed (exit 1)")
        Path(overrides["bundle_root"], "models").mkdir(parents=True, exist_ok=True)
        Path(overrides["bundle_root"], "models", "model.pt").touch()
        return 1.0

    monkeypatch.setattr(report, "run_bundle", fake_bundle)
    monkeypatch.setattr(report, "hardware", lambda: "test")
    monkeypatch.setattr("monai_wsl.data.create_glas_datalist", lambda *a, **k: {"training": [], "validation": []})
    args = report.build_parser().parse_args(["--out", str(tmp_path), "--src", "x", "--run", "--jobs", "2"])
    by_name = {r.name: r for r in report.RUNS}
    failed = report.run_all(args, [by_name["maxmin_sem"], by_name["gradcam"], by_name["cam"]])
    assert failed == 1
    assert not any(name == "gradcam" for name, _ in calls)  # Grad-CAM not tried without its model
    assert ("maxmin_sem", ("train.json", "recipes/glas.json", "evaluate.json")) in calls  # max-min evaluated
    assert "[skipped] gradcam seed 0: cam seed 0 failed" in capsys.readouterr().out


def test_set_passes_bundle_overrides_to_every_run_and_refuses_a_malformed_one(monkeypatch, tmp_path):
    """``--set KEY=VALUE`` reaches every bundle command of ``--run`` (the CPU switches of the study); a run's own
    overrides win; an item without ``=`` is a usage error naming it."""
    report = load_report()
    parser = report.build_parser()
    argv = ["--out", "x", "--set", "fold_padding=true", "--set", "memory_format=$torch.channels_last", "--set", "a=b=c"]
    settings = dict(parser.parse_args(argv).set)
    assert settings == {"fold_padding": "true", "memory_format": "$torch.channels_last", "a": "b=c"}
    script = str(REPO / "scripts" / "report.py")
    argv = [sys.executable, script, "--out", str(tmp_path), "--set", "fold"]
    done = subprocess.run(argv, capture_output=True, text=True)
    assert done.returncode == 2 and "'fold': give KEY=VALUE" in done.stderr

    calls = []

    def fake_run_bundle(configs, overrides, log, env=None):
        calls.append((list(configs), dict(overrides)))
        root = Path(overrides["bundle_root"])
        (root / "models").mkdir(parents=True, exist_ok=True)
        (root / "models" / "model.pt").write_bytes(b"")
        if "evaluate.json" in configs:
            Path(overrides["output_dir"]).mkdir(parents=True, exist_ok=True)
            (Path(overrides["output_dir"]) / "metrics.csv").write_text("val_accuracy,1.0\n")
        return 1.0

    monkeypatch.setattr(report, "run_bundle", fake_run_bundle)
    (tmp_path / "datalist.json").write_text(json.dumps({"training": [], "validation": []}))
    args = parser.parse_args(["--out", str(tmp_path), "--run", "--set", "fold_padding=true", "--set", "padding_mode=x"])
    runs = [r for r in report.RUNS if r.name in ("maxmin_sem", "pad_replicate", "eval_flips")]
    assert report.run_all(args, runs) == 0
    assert len(calls) == 5  # a training and an evaluation each, and the evaluation of maxmin_sem with flips
    assert all(overrides["fold_padding"] == "true" for _, overrides in calls)
    padding = {Path(o["bundle_root"]).parent.name: o["padding_mode"] for _, o in calls}
    assert padding == {"maxmin_sem": "x", "pad_replicate": "replicate", "eval_flips": "x"}  # a run's own wins
    # the tables' protocol is without flips (the GlaS recipe's own evaluation has them) unless the run asks
    flips = {(Path(o["bundle_root"]).parent.name, "evaluate.json" in c): o["eval_flips"] for c, o in calls}
    assert flips.pop(("eval_flips", True)) is True and not any(flips.values())


def test_earlier_tables_keep_their_recipe_and_the_defaults_group_runs_the_current_one(monkeypatch, tmp_path):
    """recipes/glas.json moved to lr 3e-3 and max-min's kmax 0.5 (table O): the runs of tables A to N still train
    with the recipe they were run with (lr 1e-3; max-min's kmax 0.3, a method file keeping its own network), without
    flips; the "defaults" group runs the recipe as it is, evaluated with its flips, and its max-min row evaluates the
    study's model of the same settings."""
    report = load_report()
    calls = {}

    def fake_run_bundle(configs, overrides, log, env=None):
        root = Path(overrides["bundle_root"])
        calls[(root.parent.name, "evaluate.json" in configs)] = (list(configs), dict(overrides))
        (root / "models").mkdir(parents=True, exist_ok=True)
        (root / "models" / "model.pt").write_bytes(b"")
        return 1.0

    monkeypatch.setattr(report, "run_bundle", fake_run_bundle)
    (tmp_path / "datalist.json").write_text(json.dumps({"training": [], "validation": []}))
    args = report.build_parser().parse_args(["--out", str(tmp_path), "--run"])
    names = ("maxmin_sem", "wildcat", "kmax_0.5_lr_3e-3", "maxmin_defaults", "wildcat_defaults", "cam_defaults")
    assert report.run_all(args, [r for r in report.RUNS if r.name in names]) == 0
    trained = {name: overrides for (name, evaluation), (_, overrides) in calls.items() if not evaluation}
    evaluated = {name: overrides for (name, evaluation), (_, overrides) in calls.items() if evaluation}
    assert set(trained) == set(names) - {"maxmin_defaults"} and set(evaluated) == set(names)
    assert trained["maxmin_sem"]["lr"] == 1e-3 and trained["maxmin_sem"]["network_def#wildcat#kmax"] == 0.3
    assert trained["wildcat"]["lr"] == 1e-3 and "network_def#wildcat#kmax" not in trained["wildcat"]
    assert (trained["kmax_0.5_lr_3e-3"]["lr"], trained["kmax_0.5_lr_3e-3"]["network_def#wildcat#kmax"]) == (3e-3, 0.5)
    for name in ("wildcat_defaults", "cam_defaults"):  # the recipe file's own values, and its flips
        assert "lr" not in trained[name] and "network_def#wildcat#kmax" not in trained[name]
        assert trained[name]["eval_flips"] is True and evaluated[name]["eval_flips"] is True
    assert all(evaluated[name]["eval_flips"] is False for name in ("maxmin_sem", "wildcat", "kmax_0.5_lr_3e-3"))
    study_model = tmp_path / "kmax_0.5_lr_3e-3" / "seed0" / "models" / "model.pt"
    assert evaluated["maxmin_defaults"]["checkpoint"] == study_model and evaluated["maxmin_defaults"]["eval_flips"]
