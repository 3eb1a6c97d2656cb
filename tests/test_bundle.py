"""The MONAI bundle, driven as the model zoo's unit tests drive bundles: ConfigWorkflow initialize / check_properties /
run / finalize on CPU, on a small synthetic set written to a temporary folder."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow
from PIL import Image

from monai_wsl.data import write_synthetic_histology

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
SMALL = {
    "synthetic_data": {"num_train": 8, "num_valid": 4, "size": [96, 96], "seed": 0},
    "resize_short_side": 80,
    "crop_size": 64,
    "num_workers": 0,
    "progress_bar": False,
    "max_epochs": 2,
    "overlay_interval": 1,
}


#: eager PyTorch whatever the machine (the default, "auto", runs ONNX Runtime on CPUs where it is installed)
TORCH = {"inference_backend": "torch"}


def small_data(folder: Path, seed: int = 0) -> str:
    """A synthetic set of 8 training and 4 validation images of 96 x 96; returns the folder holding its datalist."""
    return str(write_synthetic_histology(folder, num_train=8, num_valid=4, size=(96, 96), seed=seed).parent)


def workflow(bundle_root: Path, configs=("train.json",), workflow_type: str = "train", **overrides) -> ConfigWorkflow:
    files = [str(CONFIGS / c) for c in configs]
    return ConfigWorkflow(
        config_file=files if len(files) > 1 else files[0],
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=str(CONFIGS / "logging.conf"),
        workflow_type=workflow_type,
        bundle_root=str(bundle_root),
        **{**(SMALL if workflow_type == "train" else {}), **overrides},
    )


def run(wf: ConfigWorkflow) -> ConfigWorkflow:
    wf.initialize()
    assert wf.check_properties() == []
    wf.run()
    wf.finalize()
    return wf


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A bundle root with 2 epochs of training on the small synthetic set."""
    root = tmp_path_factory.mktemp("bundle")
    wf = run(workflow(root))
    return root, wf


def test_train_runs_and_saves_the_selected_model(trained):
    root, wf = trained
    assert wf.trainer.state.epoch == 2
    assert (root / "models" / "model.pt").is_file() and (root / "models" / "checkpoint_epoch=2.pt").is_file()
    state = torch.load(root / "models" / "model.pt", weights_only=True)
    assert "sigma" in state and "localizer_head.conv.weight" in state  # a bare state dict, as MONAI Label loads it
    metrics = wf.parser.get_parsed_content("validate#evaluator").state.metrics
    for name in ("val_accuracy", "val_f1_pos", "val_f1_neg", "val_pxap", "val_iou_pos", "val_fpr"):
        assert 0.0 <= metrics[name] <= 1.0, name
    # the schedules advanced once per epoch: sigma 0.15 -> 0.152, t 5 -> 5 * 1.01^2
    net = wf.parser.get_parsed_content("network")
    assert float(net.sigma) == pytest.approx(0.152)
    assert float(wf.parser.get_parsed_content("loss").barrier.t) == pytest.approx(5 * 1.01**2)


def test_tensorboard_holds_loss_terms_metrics_schedules_and_overlays(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, _ = trained
    events = EventAccumulator(str(root / "logs"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    expected = {"loss", "loss_ce_loc", "loss_ce_fg", "loss_bg", "loss_size", "lr", "sigma", "t", "train_accuracy"}
    expected |= {"val_accuracy", "val_f1_pos", "val_f1_neg", "val_pxap", "val_iou_pos", "val_fpr"}
    assert expected <= scalars, expected - scalars
    assert [e.value for e in events.Scalars("sigma")] == pytest.approx([0.15, 0.151])
    # the loss terms: one point per epoch (their means) and one per iteration (8 images / batch 4 = 2 per epoch),
    # under separate tags
    iterations = {f"iteration/{k}" for k in ("loss", "loss_ce_loc", "loss_ce_fg", "loss_bg", "loss_size")}
    assert iterations <= scalars and [e.step for e in events.Scalars("iteration/loss")] == [1, 2, 3, 4]
    assert [e.step for e in events.Scalars("loss")] == [1, 2]
    epoch_means = [np.mean([e.value for e in events.Scalars("iteration/loss")][i : i + 2]) for i in (0, 2)]
    assert [e.value for e in events.Scalars("loss")] == pytest.approx(epoch_means, rel=1e-5)
    images = events.Images("validation_overlay")
    assert [im.step for im in images] == [1, 2]
    # 4 validation images of 96 x 96, shown at twice their size (pictures under 128 pixels a side are enlarged), each
    # a row: image | prediction | errors, with 2-pixel gaps, 4-pixel between rows, then the key to the colours
    from monai_wsl.visualize import legend

    side = 2 * 96
    key = legend(3 * side + 2 * 2)
    assert key.shape[1] == 2 + 14
    assert (images[-1].width, images[-1].height) == (3 * side + 2 * 2, 4 * side + 4 * 4 + key.shape[1])


def read_csv_rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_train_and_evaluate_write_metrics_predictions_masks_and_overlays(trained):
    root, _ = trained
    wf = run(workflow(root, ("train.json", "evaluate.json")))
    out = root / "eval"
    summary = {name: float(value) for name, value in read_csv_rows(out / "metrics.csv")}  # MONAI's MetricsSaver
    assert set(summary) == {
        "val_accuracy",
        "val_f1_pos",
        "val_f1_neg",
        "val_iou_pos",
        "val_iou_neg",
        "val_pxap",
        "val_fpr",
    }
    assert all(0.0 <= v <= 1.0 for v in summary.values())
    f1_neg = {Path(r[0]).name: float(r[1]) for r in read_csv_rows(out / "val_f1_neg_raw.csv")[1:]}  # per image
    assert len(f1_neg) == 4 and np.mean(list(f1_neg.values())) == pytest.approx(summary["val_f1_neg"], abs=1e-4)
    predictions = {Path(r[0]).name: [float(p) for p in r[1:]] for r in read_csv_rows(out / "predictions.csv")}
    assert predictions.keys() == f1_neg.keys() and all(
        sum(p) == pytest.approx(1.0, abs=1e-5) for p in predictions.values()
    )
    labels = {
        Path(i["image"]).name: i["label"]
        for i in json.loads((root / "data" / "synthetic" / "datalist.json").read_text())["validation"]
    }
    correct = [int(np.argmax(p)) == labels[name] for name, p in predictions.items()]
    assert np.mean(correct) == pytest.approx(summary["val_accuracy"])
    # F1- of each saved mask, recomputed from the PNGs, is the per-image value that was saved
    for name, value in f1_neg.items():
        stem = name.split(".")[0]
        mask = np.array(Image.open(out / "masks" / f"{stem}_mask.png"))
        truth = np.array(Image.open(root / "data" / "synthetic" / f"{stem}_anno.png")) > 0
        assert mask.shape == truth.shape and set(np.unique(mask)) <= {0, 255}
        predicted = mask > 0
        dice_bg = 2 * (~predicted & ~truth).sum() / ((~predicted).sum() + (~truth).sum())
        assert dice_bg == pytest.approx(value, abs=1e-4)  # the CSV keeps 4 decimals
        assert (out / "overlays" / f"{stem}_overlay.png").is_file()
    assert wf.parser.get_parsed_content("eval_split") == "validation"


def test_inference_writes_masks_and_class_csv(trained, tmp_path):
    root, _ = trained
    data = root / "data" / "synthetic"
    wf = run(workflow(root, ("inference.json",), "infer", dataset_dir=str(data), output_dir=str(tmp_path)))
    images = sorted(p for p in data.glob("*.png") if not p.stem.endswith("_anno"))
    rows = read_csv_rows(tmp_path / "predictions.csv")  # image, probability of each class
    assert [Path(r[0]).name for r in rows] == [p.name for p in images]
    assert all(sum(float(p) for p in row[1:]) == pytest.approx(1.0, abs=1e-5) for row in rows)
    for image in images:
        mask = np.array(Image.open(tmp_path / f"{image.stem}_mask.png"))
        assert mask.shape == np.array(Image.open(image)).shape[:2] and set(np.unique(mask)) <= {0, 255}
    assert wf.evaluator.state.iteration == len(images)
    # the backend: "auto" runs ONNX Runtime on a CPU where it is installed (its export beside the model); eager
    # PyTorch gives the same classes and masks (a pixel may flip where M is within about 1e-5 of the threshold)
    from monai_wsl.inferers.backends import onnxruntime_available

    on_ort = onnxruntime_available() and not torch.cuda.is_available()
    backend = wf.parser.get_parsed_content("backend_network")
    assert (type(backend).__name__ == "OnnxNetwork") == on_ort == bool(list((root / "models").glob("model.*.onnx")))
    eager = tmp_path / "eager"
    run(workflow(root, ("inference.json",), "infer", dataset_dir=str(data), output_dir=str(eager), **TORCH))
    eager_rows = read_csv_rows(eager / "predictions.csv")
    assert [r[0] for r in eager_rows] == [r[0] for r in rows]
    assert np.abs(np.array([r[1:] for r in eager_rows], float) - np.array([r[1:] for r in rows], float)).max() < 1e-4
    a, b = (
        np.concatenate([np.array(Image.open(f / f"{p.stem}_mask.png")).ravel() for p in images])
        for f in (tmp_path, eager)
    )
    assert a.shape == b.shape and (a != b).mean() <= 1e-4 and 0 < (a > 0).mean() < 1
    # NIfTI on request: the same masks, 0 / 1 (NIfTI keeps MONAI's (W, H) axes of a PNG-read image)
    nifti = tmp_path / "nifti"
    run(
        workflow(root, ("inference.json",), "infer", dataset_dir=str(data), output_dir=str(nifti), output_ext=".nii.gz")
    )
    import nibabel as nib

    for image in images:
        labels = np.asarray(nib.load(nifti / f"{image.stem}_mask.nii.gz").dataobj)
        png = np.array(Image.open(tmp_path / f"{image.stem}_mask.png")) > 0
        assert set(np.unique(labels)) <= {0, 1} and np.array_equal(labels.T.astype(bool), png)


def test_verify_metadata_net_in_out_and_ckpt_export(trained, tmp_path):
    from monai.bundle import ckpt_export, verify_metadata, verify_net_in_out

    root, _ = trained
    meta, inference = str(CONFIGS / "metadata.json"), str(CONFIGS / "inference.json")
    verify_metadata(meta_file=meta, filepath=str(REPO / "tests" / "data" / "meta_schema.json"))
    verify_net_in_out(net_id="network_def", meta_file=meta, config_file=inference, n=4, bundle_root=str(root))
    ts_file = tmp_path / "model.ts"
    ckpt_export(
        net_id="network_def",
        filepath=str(ts_file),
        ckpt_file=str(root / "models" / "model.pt"),
        meta_file=meta,
        config_file=inference,
        use_trace=True,
        input_shape=[1, 3, 128, 128],
        bundle_root=str(root),
    )
    exported = torch.jit.load(str(ts_file))
    wf = ConfigWorkflow(config_file=inference, workflow_type="infer", bundle_root=str(root), logging_file=False)
    net = wf.parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(root / "models" / "model.pt", weights_only=True))
    x = torch.rand(1, 3, 128, 128) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(exported(x), net.eval()(x), rtol=1e-4, atol=1e-5)
        with pytest.raises(
            Exception, match=r"exported \(traced\) for images of \[128, 128\] pixels and is given \[160, 128\]"
        ):
            exported(torch.rand(1, 3, 160, 128))  # a traced graph keeps its sizes: another size is refused


def test_resume_continues_exactly(tmp_path):
    data = small_data(tmp_path / "data", seed=3)
    full = run(workflow(tmp_path / "full", dataset_dir=data, max_epochs=4))
    run(workflow(tmp_path / "split", dataset_dir=data, max_epochs=2))
    resumed = run(workflow(tmp_path / "split", dataset_dir=data, max_epochs=4, resume="true"))
    assert resumed.trainer.state.epoch == 4
    a = full.parser.get_parsed_content("network").state_dict()
    b = resumed.parser.get_parsed_content("network").state_dict()
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    assert float(b["sigma"]) == pytest.approx(0.154)
    assert float(resumed.parser.get_parsed_content("loss").barrier.t) == pytest.approx(5 * 1.01**4)
    m_full = full.parser.get_parsed_content("validate#evaluator").state.metrics
    m_resumed = resumed.parser.get_parsed_content("validate#evaluator").state.metrics
    assert m_full.keys() == m_resumed.keys()
    for key in m_full:
        assert m_resumed[key] == pytest.approx(m_full[key], abs=1e-5), key
    # the best model was selected from all 4 epochs in both runs
    best_full = torch.load(tmp_path / "full" / "models" / "model.pt", weights_only=True)
    best_resumed = torch.load(tmp_path / "split" / "models" / "model.pt", weights_only=True)
    for key in best_full:
        torch.testing.assert_close(best_full[key], best_resumed[key], rtol=1e-5, atol=1e-6)


def test_resume_without_checkpoint_says_so(tmp_path):
    wf = workflow(tmp_path, resume=True)
    wf.initialize()
    with pytest.raises(RuntimeError) as info:  # MONAI's config wraps the error; the user sees the chain
        wf.run()
    error = info.value
    while error.__cause__ is not None:
        error = error.__cause__
    assert isinstance(error, FileNotFoundError) and "holds no readable checkpoint_epoch=N.pt" in str(error)


def bundle_command(configs: list[str], root: Path, data: str, *extra: str, processes: int = 1) -> list[str]:
    files = "[" + ",".join(f"'{CONFIGS / c}'" if "/" not in c else f"'{c}'" for c in configs) + "]"
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nnodes=1", f"--nproc_per_node={processes}"]
    return [
        *launcher, "-m", "monai.bundle", "run", "--config_file", files, "--meta_file", str(CONFIGS / "metadata.json"),
        "--logging_file", str(CONFIGS / "logging.conf"), "--bundle_root", str(root), "--dataset_dir", data,
        "--crop_size", "64", "--resize_short_side", "80", "--num_workers", "0", "--progress_bar", "false", *extra,
    ]  # fmt: skip


@pytest.mark.slow  # a training in two processes (12 s)
def test_multi_gpu_config_runs_two_gloo_processes_on_cpu(tmp_path):
    data = small_data(tmp_path / "data")
    cmd = bundle_command(
        ["train.json", "multi_gpu_train.json"], tmp_path / "root", data, "--max_epochs", "2", processes=2
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = result.stdout + result.stderr
    # one logging process (rank 0): one validation summary and one checkpoint line per epoch
    assert log.count("Epoch[2] Metrics -- val_accuracy") == 1, log[-3000:]
    assert log.count("Saved checkpoint at epoch: 2") == 1, log[-3000:]
    assert (tmp_path / "root" / "models" / "model.pt").is_file()
    assert (tmp_path / "root" / "models" / "checkpoint_epoch=2.pt").is_file()
    state = torch.load(tmp_path / "root" / "models" / "model.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in state)  # saved without the DDP wrapper


@pytest.mark.slow
def test_two_processes_start_as_one_with_the_same_global_batch(tmp_path):
    """2 gloo processes with batch 2 each and 1 process with batch 4 see the same images in each step (no shuffling,
    no random augmentation or dropout). With multi_gpu_train.json's synchronised BatchNorm the first step's loss terms
    are the whole batch's, and so is the first update of the weights, where per-process BatchNorm (the control) gives
    other terms and an update as large as the update itself (relative L2 distance 1.7).

    The first update is compared, not the weights after a few epochs: this model at initialisation magnifies any
    change of arithmetic (one process on 2 threads instead of 1 already differs by 0.6 % in the second step's loss),
    and after 4 steps two equal trainings were as far apart as half the control (CI, 2026-12-07). In the first update:
    the classifier head, whose gradient does not pass back through BatchNorm, equals the one process's to float32
    rounding (3e-5; 2 threads 2e-5, the control 1.05); the localizer and encoder, whose gradients pass back through
    the synchronised BatchNorm (float64 statistics, autograd), differ by 3 %, 60 times less than the control (2 threads:
    5e-4). Measured on 2026-12-07 outside the bundle, with this network, loss and first batch through
    convert_sync_batchnorm and DDP: the same 3 % in float32, 6e-14 in float64 (on random images: 1e-5 in float32). So
    the 3 % is float32 arithmetic (the synchronised statistics are summed in float64, plain BatchNorm's in float32)
    magnified by this initialisation on these images, not a lost or double-counted term; test_networks.py tests the
    exact equality in float64."""
    data = small_data(tmp_path / "data")
    probe = tmp_path / "probe.json"
    deterministic = ["--train#augmentation#2#random_center", "False", "--network_def#wildcat#dropout", "0.0"]
    deterministic += [arg for i in (3, 4, 5) for arg in (f"--train#augmentation#{i}#prob", "0.0")]
    deterministic += ["--network_def#encoder", "resnet18", "--network_def#pretrained", "false", "--max_epochs", "1"]
    no_sync = ["--network", "$torch.nn.parallel.DistributedDataParallel(@network_def)"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    losses, terms, images, before, update = {}, {}, {}, {}, {}
    runs = (("one", 1, [], 1), ("one_on_2_threads", 1, [], 2), ("two", 2, [], 1), ("two_without_sync", 2, no_sync, 1))
    for name, processes, extra, threads in runs:
        folder = tmp_path / name
        folder.mkdir()
        recorders = [
            {"_target_": f"tests.bundle_probes.{cls}", "folder": str(folder)}
            for cls in ("LossRecorder", "FirstStepRecorder")
        ]
        probe.write_text(json.dumps({"+train#handlers": recorders}))
        configs = ["train.json"] + (["multi_gpu_train.json"] if processes > 1 else []) + [str(probe)]
        order = ["--train#sampler#shuffle" if processes > 1 else "--train#dataloader#shuffle", "False"]
        batch = ["--batch_size", str(4 // processes)]
        cmd = bundle_command(
            configs, folder / "root", data, *deterministic, *order, *batch, *extra, processes=processes
        )
        result = subprocess.run(
            cmd, capture_output=True, text=True, timeout=600, env={**env, "OMP_NUM_THREADS": str(threads)}, cwd=REPO
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        ranks = [json.loads((folder / f"losses_rank{r}.json").read_text()) for r in range(processes)]
        losses[name] = np.mean([[step["loss"] for step in rank] for rank in ranks], axis=0)  # ranks: half a batch each
        images[name] = [sorted(sum((rank[i]["images"] for rank in ranks), [])) for i in range(len(ranks[0]))]
        terms[name] = {k: np.mean([rank[0]["terms"][k] for rank in ranks]) for k in ranks[0][0]["terms"]}
        step = torch.load(folder / "first_step.pt", weights_only=True)
        assert step["before"].keys() == step["after"].keys() and len(step["before"]) > 50
        before[name] = torch.cat([v.flatten().double() for _, v in sorted(step["before"].items())])
        update[name] = {k: (step["after"][k] - v).flatten().double() for k, v in sorted(step["before"].items())}
    assert images["two"] == images["one"] and len(images["one"]) == 2  # the same 4 images in each of the 2 steps
    assert all(torch.equal(before[name], before["one"]) for name in before)  # the same initial weights
    assert sorted(terms["one"]) == ["loss_bg", "loss_ce_fg", "loss_ce_loc", "loss_size"]
    for term in terms["one"]:  # every term of the first step's loss, the mean over the ranks' halves
        assert terms["two"][term] == pytest.approx(terms["one"][term], rel=1e-5, abs=1e-6), term
    assert abs(losses["two_without_sync"][0] - losses["one"][0]) > 1e-3 * abs(losses["one"][0])

    def distance(name: str, part: str = "") -> float:  # the first update's relative L2 distance to one process's
        one = torch.cat([v for k, v in update["one"].items() if k.startswith(part)])
        other = torch.cat([v for k, v in update[name].items() if k.startswith(part)])
        return ((other - one).norm() / one.norm()).item()

    print({name: (distance(name, "classifier_head"), distance(name)) for name in update if name != "one"})
    assert distance("two", "classifier_head") < 1e-3 < 0.5 < distance("two_without_sync", "classifier_head")
    assert 20 * distance("two") < distance("two_without_sync")


METHODS = {  # method config -> network class
    "cam": "CAMClassifier", "cam_max": "CAMClassifier", "cam_lse": "CAMClassifier", "wildcat": "CAMClassifier",
    "deepmil": "DeepMILNet",
}  # fmt: skip


def test_the_glas_recipe_sets_max_min_pooling_and_every_method_learning_rate():
    """recipes/glas.json carries the mask-quality study's two changes (docs/results.md, tables N and O): lr 3e-3 for
    every method, and kmax 0.5 for max-min's localizer only; a method file after it brings its own network (WILDCAT
    keeps its kmax 0.3, CAM has no WILDCAT pooling), and train.json alone keeps the paper's values."""
    from monai.bundle import ConfigParser

    def parsed(*files):
        parser = ConfigParser()
        parser.read_config([str(CONFIGS / f) for f in files])
        parser["network_def#pretrained"] = False
        return parser.get_parsed_content("lr"), parser.get_parsed_content("network_def")

    lr, net = parsed("train.json", "recipes/glas.json")
    assert lr == 3e-3 and (net.localizer_head.pool.kmax, net.classifier_head.pool.kmax) == (0.5, 0.5)
    lr, net = parsed("train.json")
    assert lr == 1e-3 and net.localizer_head.pool.kmax == 0.3
    lr, net = parsed("train.json", "recipes/glas.json", "methods/wildcat.json")
    assert lr == 3e-3 and net.get_config()["wildcat"]["kmax"] == 0.3
    lr, net = parsed("train.json", "recipes/glas.json", "methods/cam.json")
    assert lr == 3e-3 and (net.get_config()["pooling"], net.get_config()["wildcat"]) == ("avg", None)


def test_the_glas_recipe_trains_in_the_cpu_layout_on_cpus_and_train_json_as_built():
    """recipes/glas.json: fold_padding and memory_format "auto" (table O: the same masks over three seeds, 1.4 times
    as fast), so on a CPU the network it trains is channels-last with its padding folded; train.json alone (the quick
    start and the recipes built on it) keeps the network as built."""
    from monai.bundle import ConfigParser

    def placed(*files):
        parser = ConfigParser()
        parser.read_config([str(CONFIGS / f) for f in files])
        parser.update({"network_def#pretrained": False, "device": "$torch.device('cpu')"})
        net = parser.get_parsed_content("network")
        convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size[0] > 1]
        padding_modules = [m for m in net.modules() if "Pad" in type(m).__name__]  # the stride-1 ones get folded
        last = all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
        return last, len(padding_modules), convs[0].weight.is_contiguous()

    last, pads_layout, _ = placed("train.json", "recipes/glas.json")
    built_last, pads_built, contiguous = placed("train.json")
    assert last and not built_last and contiguous
    assert pads_layout < pads_built


@pytest.mark.parametrize("method", ["cam_lse", "deepmil"])
def test_baselines_train_and_validate_through_the_same_bundle(method, tmp_path):
    wf = run(workflow(tmp_path / "root", ("train.json", f"methods/{method}.json"), max_epochs=1))
    metrics = wf.parser.get_parsed_content("validate#evaluator").state.metrics
    for name in ("val_accuracy", "val_f1_pos", "val_f1_neg", "val_pxap", "val_fpr"):
        assert 0.0 <= metrics[name] <= 1.0, name
    assert "loss_ce" in wf.trainer.state.metrics and "sigma" not in wf.trainer.state.metrics  # no max-min schedule
    assert type(wf.parser.get_parsed_content("network")).__name__ == METHODS[method]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_each_method_config_names_its_network_and_loss(method, tmp_path):
    """The override files swap the network and the loss, nothing else: every setting they give is one the class takes
    (a config typo raises instead of being dropped)."""
    wf = workflow(tmp_path, ("train.json", f"methods/{method}.json"))
    wf.initialize()
    net = wf.parser.get_parsed_content("network_def")
    assert type(net).__name__ == METHODS[method]
    assert type(wf.parser.get_parsed_content("loss")).__name__ == "WSLCrossEntropyLoss"
    if method.startswith("cam") or method == "wildcat":
        assert net.pooling == {"cam": "avg", "cam_max": "max", "cam_lse": "lse"}.get(method, "wildcat")
    typo = workflow(tmp_path, ("train.json", f"methods/{method}.json"), **{"network_def#kmaxx": 0.2})
    with pytest.raises(RuntimeError) as info:
        typo.initialize()  # the pre-flight check builds the network
    error, text = info.value, ""
    while error is not None:
        text, error = text + str(error), error.__cause__
    assert "unexpected keyword argument 'kmaxx'" in text


def test_gradcam_evaluates_a_trained_cam_model(tmp_path):
    """Grad-CAM is an evaluation of a CAM model: methods/gradcam.json swaps the validation inferer only."""
    data = small_data(tmp_path / "data")
    cam = ("train.json", "methods/cam.json")
    run(workflow(tmp_path / "cam", cam, dataset_dir=data, max_epochs=1))
    checkpoint = str(tmp_path / "cam" / "models" / "model.pt")
    scores = {}
    for method in ("cam", "gradcam", "gradcampp"):
        extra = () if method == "cam" else (f"methods/{method}.json",)
        wf = run(workflow(tmp_path / method, (*cam, "evaluate.json", *extra), dataset_dir=data, checkpoint=checkpoint))
        assert type(wf.parser.get_parsed_content("validate#inferer")).__name__ == (
            "WSLInferer" if method == "cam" else "GradCAMInferer"
        )
        scores[method] = wf.parser.get_parsed_content("validate#evaluator").state.metrics
    # the same model: the same classes; Grad-CAM++ weighs the gradients otherwise (Grad-CAM of a GAP classifier is
    # its CAM up to a ReLU, so those two maps may coincide)
    assert scores["gradcam"]["val_accuracy"] == scores["gradcampp"]["val_accuracy"] == scores["cam"]["val_accuracy"]
    assert scores["gradcampp"]["val_pxap"] != scores["gradcam"]["val_pxap"]


@pytest.mark.slow  # a GlaS training (29 s)
def test_training_ends_with_a_summary_and_models_say_what_they_know(tmp_path, shared_data):
    """The end of a training names the selected model, its epoch and metrics and the TensorBoard command; its model
    card records the synthetic training data, and inference warns when that model meets other images."""
    root = tmp_path / "root"
    small = '{"num_train": 8, "num_valid": 4, "size": [96, 96], "seed": 0}'
    train = bundle_command(["train.json"], root, str(root / "data" / "synthetic"), "--max_epochs", "2")
    done = subprocess.run(train + ["--synthetic_data", small], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    card = json.loads((root / "models" / "model_card.json").read_text())
    assert f"selected model: {root / 'models' / 'model.pt'}" in done.stdout
    assert f"selected epoch: {card['selected_epoch']}, the best val_accuracy" in done.stdout
    assert f"val_f1_neg: {card['validation']['val_f1_neg']:.4f}" in done.stdout
    assert f"tensorboard --logdir {root / 'logs'}" in done.stdout
    assert card["trained_on"]["synthetic"] is True and card["trained_on"]["class_names"] == ["benign", "malignant"]

    def infer(folder: Path) -> str:
        cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(CONFIGS / "inference.json"),
               "--bundle_root", str(root), "--dataset_dir", str(folder), "--num_workers", "0"]  # fmt: skip
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return result.stdout + result.stderr

    glas = tmp_path / "glas"
    glas.mkdir()
    shutil.copy(shared_data / "glas" / "train_1.jpg", glas)
    warning = "was trained on the embedded synthetic set"
    assert warning in infer(glas)
    own = infer(root / "data" / "synthetic")
    assert warning not in own and f"inference: the results are in {root / 'inference'}" in own
