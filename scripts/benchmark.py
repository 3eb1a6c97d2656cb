"""Speed of the bundle, end to end or one training step.

``--recipe glas`` runs the bundle itself (``train.json`` + ``recipes/glas.json`` on GlaS, the same configs and data
as a user's training) for ``--epochs`` epochs under Ignite's profilers (``HandlersTimeProfiler`` on the trainer,
``BasicTimeProfiler`` on the validation) and prints, per epoch, where the time went: waiting for data, the training
steps, validation (its data, forward passes, the handlers at each iteration's and the epoch's end: the metrics, the
best model's saver, the stats; and its other handlers) and the trainer's other handlers (TensorBoard, schedules,
checkpoints, ...). It then times the pure compute of the same work in the same process (the same training steps on
batches already in memory, the same validation forward passes) and extrapolates the recipe's 80 epochs.

Without ``--recipe``: one training step of the max-min model against a plain classifier with the same encoder on the
same batch (the max-min step does about 1 + 2 x 0.8^2 = 2.28 encoder passes).

    OMP_NUM_THREADS=2 python scripts/benchmark.py --recipe glas --epochs 5     # 2 CPU cores
    python scripts/benchmark.py --recipe glas --override fold_padding=false 'memory_format=$torch.contiguous_format'
    python scripts/benchmark.py                                    # CPU, EfficientNet-lite0, 4 x 3 x 224 x 224

(``--override`` takes any bundle setting as ``id=value``; the two above train the network as built instead of the
GlaS recipe's CPU layout, which does not repeat the other's fixed-seed results bit for bit: bundle/docs/README.md,
"Speed on CPUs".)
    python scripts/benchmark.py --device cuda --amp --size 416 --steps 50

``--wsi SLIDE``: whole-slide inference (``SlideInferer``, the path of ``inference_wsi.json``: tissue mask, patches
read through OpenSlide, merging, the map's files) against the network's forward pass alone on the same patches,
already in memory, in the same process; patches per second of each, their ratio and the peak memory.

    OMP_NUM_THREADS=2 python scripts/benchmark.py --wsi SLIDE --size 512 --batch 8 [--checkpoint model.pt]

(``--merger memory`` or ``zarr`` keeps the map in memory or on disk; ``auto``, the bundle's, puts it on disk when its
buffers exceed 2 GB.)

``--inference-backend torch,onnxruntime`` runs the whole-slide path and the forward pass on each backend, alternated
(``monai_wsl.inferers.backends``; the export is made before the timing).

``--backends``: the network alone on one batch of ``--batch`` x 3 x ``--size`` x ``--size``, eager PyTorch (also in
channels-last) against its ONNX export run by ONNX Runtime and, where installed, OpenVINO (f32): patches per second
of the mask alone (``segment``, what ``MaskOutput`` gives) and of the mask and the class (``predict``, what the
slide path runs), and each backend's largest difference from eager PyTorch.

    OMP_NUM_THREADS=1 python scripts/benchmark.py --backends --size 512 --batch 8 [--checkpoint model.pt] [--images DIR]
"""

from __future__ import annotations

import argparse
import ast
import json
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------------- end to end


class EpochSplit:
    """Per-epoch sums of Ignite's profilers: ``HandlersTimeProfiler`` on the trainer (it runs once) and
    ``BasicTimeProfiler`` on the validation evaluator (it runs once per epoch; this profiler removes its timers at the
    end of each run, so no run is counted twice)."""

    def __init__(self, trainer, evaluator) -> None:
        from ignite.engine import Events
        from ignite.handlers.time_profilers import BasicTimeProfiler, HandlersTimeProfiler

        self.trainer_profiler, self.evaluator_profiler = HandlersTimeProfiler(), BasicTimeProfiler()
        self.trainer_profiler.attach(trainer)
        self.evaluator_profiler.attach(evaluator)
        self.validations: list[dict[str, float]] = []
        self.epochs: list[dict[str, float]] = []
        evaluator.add_event_handler(Events.COMPLETED, self._validation_done)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_done)
        self._seen = {"data": 0, "step": 0}
        self._epoch_start = time.perf_counter()
        trainer.add_event_handler(Events.EPOCH_STARTED, lambda _: setattr(self, "_epoch_start", time.perf_counter()))

    def _validation_done(self, engine) -> None:
        """The evaluator's run, read as it completes: data, forward (inferer and postprocessing), the handlers of
        ITERATION_COMPLETED and EPOCH_COMPLETED (the metrics' updates and computations, and in the bundle the best
        model's saver, the stats and TensorBoard handlers: ``BasicTimeProfiler`` times events, not handlers) and the
        other handlers."""
        from ignite.engine import Events

        p = self.evaluator_profiler
        handlers = {event: float(times.sum()) for event, times in p.event_handlers_times.items()}
        handlers.pop(Events.COMPLETED, None)  # not measured until after this handler
        completed = handlers.pop(Events.ITERATION_COMPLETED, 0.0) + handlers.pop(Events.EPOCH_COMPLETED, 0.0)
        self.validations.append(
            {
                "val_data": float(p.dataflow_times.sum()),
                "val_forward": float(p.processing_times.sum()),  # inferer + postprocessing
                "val_end_handlers": completed,
                "val_handlers": sum(handlers.values()),
            }
        )

    def _epoch_done(self, engine) -> None:
        p = self.trainer_profiler
        data, steps = p.dataflow_times[self._seen["data"] :], p.processing_times[self._seen["step"] :]
        self._seen = {"data": len(p.dataflow_times), "step": len(p.processing_times)}
        self.epochs.append({"data": float(sum(data)), "steps": float(sum(steps)), "_start": self._epoch_start})
        v = self.validations[-1] if len(self.validations) == len(self.epochs) else {}
        print(
            f"epoch {len(self.epochs)}: {time.perf_counter() - self._epoch_start:.2f} s (data {sum(data):.2f}, "
            f"steps {sum(steps):.2f}, validation {sum(v.values()):.2f})",
            flush=True,
        )

    def rows(self) -> list[dict[str, float]]:
        """One dict per epoch; the epoch's wall time is measured from its start to the end of all its handlers."""
        totals = [v["_start"] for v in self.epochs[1:]] + [self._end]
        out = []
        for epoch, validation, end in zip(self.epochs, self.validations, totals):
            total = end - epoch["_start"]
            validation_total = sum(validation.values())
            row = {"total": total, "data": epoch["data"], "steps": epoch["steps"], **validation}
            row["other_handlers"] = total - epoch["data"] - epoch["steps"] - validation_total
            out.append(row)
        return out

    def finish(self) -> None:
        self._end = time.perf_counter()


def pure_compute(wf) -> dict[str, float]:
    """Seconds of the same work without the bundle around it: one epoch of training steps (forward, loss, backward,
    optimiser step) on batches already in memory, and the validation forward passes on images already in memory."""
    trainer, evaluator = wf.trainer, wf.parser.get_parsed_content("validate#evaluator")
    network, loss_fn, optimizer, inferer = trainer.network, trainer.loss_function, trainer.optimizer, evaluator.inferer
    device = wf.parser.get_parsed_content("device")
    train_batches = [(b["image"].to(device), b["label"].to(device)) for b in trainer.data_loader]
    val_images = [b["image"].to(device) for b in evaluator.data_loader]
    amp = bool(trainer.amp)
    network.train()
    start = time.perf_counter()
    for x, y in train_batches:
        with torch.autocast(device.type, enabled=amp):
            loss = loss_fn(network(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    _sync(device)
    steps = time.perf_counter() - start
    network.eval()
    start = time.perf_counter()
    with torch.no_grad(), torch.autocast(device.type, enabled=amp):
        for x in val_images:
            inferer(x, network)
    _sync(device)
    return {"steps": steps, "validation": time.perf_counter() - start}


def _override(text: str) -> tuple[str, object]:
    """``id=value`` as the bundle's command line reads it: a Python literal (``0``, ``true``, ``[1]``) or a string."""
    key, sep, value = text.partition("=")
    if not sep:
        raise SystemExit(f"--override {text!r}: give id=value, e.g. num_workers=0")
    try:
        return key, ast.literal_eval({"true": "True", "false": "False"}.get(value, value))
    except (ValueError, SyntaxError):
        return key, value


def run_recipe(recipe: str, epochs: int, out: Path, overrides: dict | None = None, src: str | None = None) -> dict:
    """Run the bundle for ``epochs`` epochs of ``recipe`` (``"quick_start"``: ``train.json`` as is, on the embedded
    synthetic set; ``"glas"``: with ``recipes/glas.json`` on the GlaS folder ``src``) in ``out``, then its pure compute;
    returns the per-epoch split, their mean, the pure compute and the extrapolated recipe time."""
    from monai.bundle import ConfigParser, ConfigWorkflow

    from monai_wsl.data import create_glas_datalist

    configs = [str(CONFIGS / "train.json")] + (
        [str(CONFIGS / "recipes" / f"{recipe}.json")] * (recipe != "quick_start")
    )
    recipe_epochs = ConfigParser.load_config_files(configs)["max_epochs"]
    out.mkdir(parents=True, exist_ok=True)
    settings = {"bundle_root": str(out / "bundle"), "max_epochs": epochs, "progress_bar": False}
    if recipe == "glas":
        (out / "datalist.json").write_text(json.dumps(create_glas_datalist(src)))
        settings["dataset_dir"] = str(out)
    wf = ConfigWorkflow(
        config_file=configs,
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=str(CONFIGS / "logging.conf"),
        workflow_type="train",
        **{**settings, **(overrides or {})},
    )
    wf.initialize()
    split = EpochSplit(wf.trainer, wf.parser.get_parsed_content("validate#evaluator"))
    start = time.perf_counter()
    wf.run()
    split.finish()
    wall = time.perf_counter() - start
    rows = split.rows()
    compute = pure_compute(wf)
    wf.finalize()
    steady = rows[1:] if len(rows) > 1 else rows  # the first epoch also builds the caches
    mean = {k: sum(r[k] for r in steady) / len(steady) for k in rows[0]}
    return {
        "device": _device_name(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
        "recipe": recipe,
        "epochs": rows,
        "mean_epoch": mean,
        "pure_compute": compute,
        "epoch_over_compute": mean["total"] / (compute["steps"] + compute["validation"]),
        "run_seconds": wall,
        "recipe_epochs": recipe_epochs,
        # start-up and epoch 1 as measured, the other epochs at the mean of the later ones
        "recipe_minutes": (wall - sum(r["total"] for r in steady) + mean["total"] * (recipe_epochs - 1)) / 60,
    }


def print_recipe(r: dict, epochs: int) -> None:
    columns = ["total", "data", "steps", "val_data", "val_forward", "val_end_handlers", "val_handlers"]
    columns.append("other_handlers")
    print(f"device {r['device']}; seconds per epoch (validation every epoch)")
    print("epoch " + " ".join(f"{c:>16}" for c in columns))
    for i, row in enumerate(r["epochs"], 1):
        print(f"{i:>5} " + " ".join(f"{row[c]:16.2f}" for c in columns))
    print("mean* " + " ".join(f"{r['mean_epoch'][c]:16.2f}" for c in columns) + "   (* without epoch 1)" * (epochs > 1))
    c = r["pure_compute"]
    print(f"pure compute of one epoch: {c['steps']:.2f} s training steps + {c['validation']:.2f} s validation forward")
    print(f"epoch time / pure compute: {r['epoch_over_compute']:.2f}")
    minutes, seconds = r["recipe_minutes"], r["run_seconds"]
    print(f"the recipe's {r['recipe_epochs']} epochs: {minutes:.1f} minutes (this run: {seconds:.0f} s)")


# ------------------------------------------------------------------------------------------------- one step


def time_training_steps(net, loss_fn, x, y, steps: int, warmup: int, amp: bool, dtype: torch.dtype) -> float:
    """Seconds per training step (median over ``steps`` after ``warmup`` steps)."""
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9, nesterov=True, weight_decay=1e-4)
    device = x.device
    scaler = torch.amp.GradScaler(device.type, enabled=amp and dtype == torch.float16)
    net.train()
    times = []
    for i in range(warmup + steps):
        _sync(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=amp):
            loss = loss_fn(net(x), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def run_step(args) -> dict:
    from monai_wsl.losses import MaxMinUncertaintyLoss, WSLCrossEntropyLoss
    from monai_wsl.networks import CAMClassifier, MaxMinUncertaintyNet

    torch.manual_seed(0)
    dev = torch.device(args.device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    x = torch.randn(args.batch, 3, args.size, args.size, device=dev).contiguous(memory_format=memory_format)
    y = torch.randint(0, 2, (args.batch,), device=dev)
    maxmin = MaxMinUncertaintyNet(encoder=args.encoder).to(dev, memory_format=memory_format)
    plain = CAMClassifier(encoder=args.encoder, pooling="avg").to(dev, memory_format=memory_format)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, None: None}[args.amp_dtype]
    dtype = dtype or (torch.bfloat16 if dev.type == "cpu" else torch.float16)
    results = {}
    # Alternate the two models so that a slow phase of the machine hits both.
    for _ in range(2):
        for name, net, loss_fn in (
            ("plain", plain, WSLCrossEntropyLoss()),
            ("maxmin", maxmin, MaxMinUncertaintyLoss()),
        ):
            seconds = time_training_steps(net, loss_fn, x, y, args.steps, args.warmup, args.amp, dtype)
            results[name] = min(results.get(name, seconds), seconds)
    return {
        "device": _device_name(dev),
        "encoder": args.encoder,
        "input": [args.batch, 3, args.size, args.size],
        "amp": str(dtype).replace("torch.", "") if args.amp else False,
        "plain_images_per_s": args.batch / results["plain"],
        "maxmin_images_per_s": args.batch / results["maxmin"],
        "time_ratio": results["maxmin"] / results["plain"],
    }


def run_wsi(args) -> dict:
    import resource

    from monai_wsl.inferers import SlideInferer
    from monai_wsl.networks import MaxMinUncertaintyNet
    from monai_wsl.utils import keep_freed_memory

    torch.manual_seed(0)
    dev = torch.device(args.device)
    keep_freed_memory(dev)  # as inference_wsi.json does
    net = MaxMinUncertaintyNet(encoder=args.encoder, pretrained=True).eval().to(dev)
    if args.checkpoint:
        net.load_state_dict(torch.load(args.checkpoint, map_location=dev, weights_only=True))
    out = Path(args.out or tempfile.mkdtemp(prefix="monai_wsl_benchmark_wsi_"))
    backends = args.inference_backend.split(",")
    inferers = {}
    for backend in backends:
        inferer = SlideInferer(
            net,
            out / backend,
            patch_size=args.size,
            overlap=args.overlap,
            level=args.level,
            batch_size=args.batch,
            num_workers=2 if args.num_workers is None else args.num_workers,
            device=dev,
            amp=args.amp,
            progress=False,
            checkpoint=args.checkpoint,  # the export goes beside it (without one, into a temporary folder)
            inference_backend=backend,
            merger=args.merger,
        )
        inferers[inferer.inference_backend] = inferer
    first = next(iter(inferers.values()))
    setup = first.prepare(args.wsi)
    patches = [p for p, _ in setup["splitter"](str(args.wsi))]  # the same patches, read once, kept in memory
    batches = [torch.cat(patches[i : i + args.batch]) for i in range(0, len(patches), args.batch)]

    def forward_only(inferer) -> float:
        start = time.perf_counter()
        for batch in batches:
            inferer.infer_patches(batch)
        _sync(dev)
        return time.perf_counter() - start

    def whole_path(inferer) -> float:
        start = time.perf_counter()
        inferer(args.wsi)
        _sync(dev)
        return time.perf_counter() - start

    for inferer in inferers.values():
        forward_only(inferer)  # warm-up (and the export, for ONNX Runtime)
    times: dict[str, dict[str, list[float]]] = {b: {"forward": [], "whole": []} for b in inferers}
    plan_s, read_s = [], []  # the plan (open the slide, find the tissue, the grid) and the reading, apart
    for _ in range(args.repeats):  # alternated, so that a slow phase of the machine hits each
        for backend, inferer in inferers.items():
            times[backend]["whole"].append(whole_path(inferer))
            times[backend]["forward"].append(forward_only(inferer))
        start = time.perf_counter()
        plan = first.prepare(args.wsi)
        plan_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        sum(1 for _ in plan["splitter"](str(args.wsi)))  # with the splitter's reader threads, as in the whole path
        read_s.append(time.perf_counter() - start)
    n = len(patches)
    rows = {}
    for backend, t in times.items():
        best = {k: min(v) for k, v in t.items()}
        rows[backend] = {
            "whole_path_s": t["whole"],
            "forward_only_s": t["forward"],
            "whole_path_patches_per_s": n / best["whole"],
            "forward_only_patches_per_s": n / best["forward"],
            "ratio": best["forward"] / best["whole"],
            # where the whole path's time goes: the plan and the reading measured apart (reading overlaps the network
            # in the whole path, so "rest", merging and the files, is a lower bound)
            "split_s": {
                "plan": min(plan_s),
                "read": min(read_s),
                "forward": best["forward"],
                "rest": best["whole"] - min(plan_s) - best["forward"] - min(read_s),
            },
        }
    return {
        "device": _device_name(dev),
        "slide": str(args.wsi),
        "level": setup["level"],
        "patch_size": args.size,
        "overlap": args.overlap,
        "batch": args.batch,
        "patches_run": n,
        "patches_total": len(setup["plan"]["positions"]),
        **rows[next(iter(rows))],  # the first backend's figures under the keys of a single-backend run
        "backends": rows,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _patches(folder: str, n: int, size: int) -> torch.Tensor:
    """``n`` crops of ``size`` pixels (in [0, 1]) from the images of ``folder``, one a image in turn, at a fixed
    random place (reflected where an image is smaller)."""
    import numpy as np
    from PIL import Image

    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in (".png", ".jpg", ".bmp", ".tif"))
    files = [p for p in files if "anno" not in p.stem]
    rng = np.random.default_rng(0)
    crops = []
    for i in range(n):
        image = np.asarray(Image.open(files[i % len(files)]).convert("RGB"), np.float32) / 255
        pad = [(0, max(0, size - image.shape[0])), (0, max(0, size - image.shape[1])), (0, 0)]
        image = np.pad(image, pad, mode="reflect")
        y, x = (int(rng.integers(0, image.shape[d] - size + 1)) for d in (0, 1))
        crops.append(torch.from_numpy(image[y : y + size, x : x + size].transpose(2, 0, 1).copy()))
    return torch.stack(crops)


def run_backends(args) -> dict:
    """The network alone on one batch: eager PyTorch (contiguous and channels-last), ONNX Runtime and OpenVINO (f32,
    when installed) on the same export; patches per second of ``segment`` and ``predict``, and the largest
    difference of each output from eager PyTorch's."""
    import importlib.util

    import numpy as np

    from monai_wsl.inferers.backends import OnnxNetwork
    from monai_wsl.networks import MaxMinUncertaintyNet

    torch.manual_seed(0)
    net = MaxMinUncertaintyNet(encoder=args.encoder, pretrained=True).eval()
    if args.checkpoint:
        net.load_state_dict(torch.load(args.checkpoint, map_location="cpu", weights_only=True))
    x = _patches(args.images, args.batch, args.size) if args.images else torch.rand(args.batch, 3, args.size, args.size)
    x = x * 2 - 1  # the bundle's intensity range
    ort_net = OnnxNetwork(net)
    with torch.no_grad():
        reference = net.predict(x)
    runners = {"torch": (net.segment, net.predict)}
    last = MaxMinUncertaintyNet(encoder=args.encoder).eval().to(memory_format=torch.channels_last)
    last.load_state_dict(net.state_dict())
    xl = x.contiguous(memory_format=torch.channels_last)
    runners["torch channels-last"] = (lambda _: last.segment(xl), lambda _: last.predict(xl))
    runners["onnxruntime"] = (ort_net.segment, ort_net.predict)
    if importlib.util.find_spec("openvino") is not None:
        import openvino as ov

        core = ov.Core()
        config = {"INFERENCE_NUM_THREADS": torch.get_num_threads(), "INFERENCE_PRECISION_HINT": "f32"}
        compiled = {}
        for kind in ("segment", "predict"):
            ort_net.session(tuple(x.shape[2:]), kind)  # the export, beside the others
            compiled[kind] = core.compile_model(str(ort_net.export_path(tuple(x.shape[2:]), kind)), "CPU", config)

        def ov_run(kind):
            def run(x):
                out = compiled[kind]({"image": x.numpy()})
                values = [torch.from_numpy(np.asarray(out[o])) for o in compiled[kind].outputs]
                return values[0] if kind == "segment" else {"mask": values[0], "logits": values[1]}

            return run

        runners["openvino f32"] = (ov_run("segment"), ov_run("predict"))
    rows: dict[str, dict] = {}
    with torch.no_grad():
        for name, (segment, predict) in runners.items():  # warm-up (exports, compilations) and the differences
            segment(x)
            got = predict(x)
            rows[name] = {
                "mask_max_abs_diff": float((got["mask"] - reference["mask"]).abs().max()),
                "mask_mean_abs_diff": float((got["mask"] - reference["mask"]).abs().mean()),
                "logits_max_abs_diff": float((got["logits"] - reference["logits"]).abs().max()),
                "segment_s": [],
                "predict_s": [],
            }
        for _ in range(args.repeats):  # alternated, so that a slow phase of the machine hits each
            for name, (segment, predict) in runners.items():
                for kind, run in (("segment", segment), ("predict", predict)):
                    start = time.perf_counter()
                    run(x)
                    rows[name][f"{kind}_s"].append(time.perf_counter() - start)
    for row in rows.values():
        for kind in ("segment", "predict"):
            row[f"{kind}_patches_per_s"] = args.batch / min(row[f"{kind}_s"])
    return {"device": _device_name(torch.device("cpu")), "input": list(x.shape), "backends": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", choices=["glas", "quick_start"], help="time the bundle end to end with this recipe")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of the end-to-end run")
    parser.add_argument("--src", default=str(REPO.parent / "shared" / "data" / "glas"), help="GlaS folder")
    parser.add_argument("--out", help="folder for the run's datalist, models and logs (default: a temporary one)")
    parser.add_argument(
        "--num-workers",
        type=int,
        help="--recipe: the DataLoader's workers (default: the bundle's, 0 on CPUs); --wsi: patch-reading threads (2)",
    )
    parser.add_argument("--override", nargs="*", default=[], help="more bundle overrides, as id=value")
    parser.add_argument("--encoder", default="efficientnet-lite0")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", action="store_true", help="mixed precision (--amp-dtype)")
    parser.add_argument(
        "--amp-dtype",
        choices=["bf16", "fp16"],
        help="--amp's type (default: bf16 on CPU, fp16 with a GradScaler on CUDA, as the bundle trains)",
    )
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--wsi", help="time whole-slide inference on this slide against the forward pass alone")
    parser.add_argument("--checkpoint", help="--wsi: a model.pt (default: ImageNet encoder, untrained heads)")
    parser.add_argument("--level", type=int, default=0, help="--wsi: the slide level to run at")
    parser.add_argument("--overlap", type=float, default=0.0, help="--wsi: the patches' overlap (a fraction)")
    parser.add_argument("--repeats", type=int, default=2, help="--wsi, --backends: timed runs of each")
    parser.add_argument(
        "--inference-backend",
        default="torch",
        help="--wsi: the backend(s), comma-separated: torch, onnxruntime, auto (e.g. torch,onnxruntime)",
    )
    parser.add_argument(
        "--merger",
        default="auto",
        choices=["auto", "memory", "zarr"],
        help="--wsi: where the map is merged (the bundle's 'auto': on disk when its buffers exceed 2 GB)",
    )
    parser.add_argument("--backends", action="store_true", help="the network alone on each inference backend")
    parser.add_argument("--images", help="--backends: crop the batch from the images of this folder (default: noise)")
    args = parser.parse_args()
    if args.backends:
        r = run_backends(args)
        print(f"device {r['device']}, input {tuple(r['input'])}; patches/s (best of {args.repeats}), max |diff|")
        for name, row in r["backends"].items():
            print(
                f"{name:20s}: segment {row['segment_patches_per_s']:7.2f}  predict {row['predict_patches_per_s']:7.2f}"
                f"  mask {row['mask_max_abs_diff']:.1e} (mean {row['mask_mean_abs_diff']:.1e})"
                f"  logits {row['logits_max_abs_diff']:.1e}"
            )
    elif args.wsi:
        r = run_wsi(args)
        print(f"device {r['device']}, slide {r['slide']} level {r['level']}, patches {r['patch_size']} px")
        print(f"patches run      : {r['patches_run']} of {r['patches_total']} (the rest is background)")
        for backend, row in r["backends"].items():
            print(f"[{backend}] (best of {args.repeats})")
            for key, name in (("whole_path", "whole path      "), ("forward_only", "forward only    ")):
                print(f"{name} : {row[f'{key}_patches_per_s']:8.2f} patches/s  {min(row[f'{key}_s']):.2f} s")
            print(f"ratio            : {row['ratio']:8.2f} (forward-only time / whole-path time)")
            split = ", ".join(f"{k} {v:.2f}" for k, v in row["split_s"].items())
            print(f"where the time goes: {split} s (best runs; reading overlaps the network in the whole path)")
        print(f"peak memory      : {r['peak_rss_mb']:8.0f} MB")
    elif args.recipe:
        out = Path(args.out or tempfile.mkdtemp(prefix="monai_wsl_benchmark_"))
        workers = {} if args.num_workers is None else {"num_workers": args.num_workers}
        overrides = {**workers, **dict(_override(o) for o in args.override)}
        r = run_recipe(args.recipe, args.epochs, out, overrides, args.src)
        print_recipe(r, args.epochs)
    else:
        r = run_step(args)
        print(f"device {r['device']}, encoder {r['encoder']}, input {tuple(r['input'])}, amp {r['amp']}")
        print(f"plain classifier : {r['plain_images_per_s']:8.2f} images/s")
        print(f"max-min          : {r['maxmin_images_per_s']:8.2f} images/s")
        print(f"time ratio       : {r['time_ratio']:8.2f} (max-min / plain; about 2.28 encoder passes)")
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
