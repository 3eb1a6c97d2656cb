r"""Reproduce the paper's comparison through the bundle: train and evaluate every method and variant on GlaS, then
write the table (and a figure of masks) in the paper's form.

Every run is a list of the bundle's config files (``train.json``, ``recipes/glas.json``, a ``methods/*.json``
override, ``evaluate.json``) with a few command-line overrides (the loss switches of the ablation), run by
``scripts/bundle_runner.py``. Each lives in ``<out>/<run>/seed<k>/`` (models, TensorBoard logs, evaluations); the
table is read back from the saved evaluations (``metrics.csv``, or the ``summary.json`` of evaluations made before
the bundle used MONAI's ``MetricsSaver``), so a second call without ``--run`` regenerates it.

    # the 67 / 18 development split, reduced CPU schedule (docs/results.md, table B)
    python scripts/report.py --src ../shared/data/glas --out runs/glas --run \
        --max-epochs 20 --crop-size 224 --resize-short-side 240
    # regenerate the table and the figure from the saved evaluations
    python scripts/report.py --out runs/glas
    # on one large GPU: the methods side by side, seed 0 of each first (docs/results.md, table E)
    python scripts/report.py --src ../shared/data/glas --out runs/full --run --groups methods --seeds 0 1 2 --jobs 6
    # the paper's protocol on a full GlaS release: 67 / 18 selection split, 80 epochs, test on testA + testB
    python scripts/report.py --src GLAS_RELEASE --splits ../shared/data/glas/splits --out runs/paper --run \
        --eval-split test --groups methods
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from bundle_runner import job_environment, run_bundle, run_side_by_side


@dataclass
class Run:
    group: str
    name: str
    label: str
    configs: tuple[str, ...] = ()  # override files after train.json and the GlaS recipe (methods/*.json)
    overrides: dict = field(default_factory=dict)  # command-line overrides (the loss switches)
    same_as: str | None = None  # reuse another run's evaluations (the same training)
    evaluates: str | None = None  # evaluate this run's trained model with these configs (Grad-CAM over CAM)


NO_ASC = {"loss_def#size_constraint": False}  # the loss switch of the ablation
# the GlaS recipe every group but "defaults" ran with (tables A to N): recipes/glas.json before 2026-12-07 took the
# paper's learning rate and max-min's WILDCAT kmax; pinned so that their commands still give their tables
RECIPE_2026_11 = {"lr": 1e-3}
KMAX_2026_11 = {"network_def#wildcat#kmax": 0.3}  # max-min's network only (a method file brings its own network)
SIGMA = "maxmin_schedules#0#schedule"  # train.json's sigma schedule, a function of the epoch
RUNS = [
    Run("methods", "maxmin_sem", "Max-min (SEM), ours"),
    Run("methods", "maxmin_eem", "Max-min (EEM), ours", overrides={"loss_def#bg_term": "eem"}),
    Run("methods", "deepmil", "Deep MIL (attention)", ("methods/deepmil.json",)),
    Run("methods", "wildcat", "WILDCAT", ("methods/wildcat.json",)),
    Run("methods", "gradcam", "Grad-CAM", ("methods/cam.json", "methods/gradcam.json"), evaluates="cam"),
    Run("methods", "gradcampp", "Grad-CAM++", ("methods/cam.json", "methods/gradcampp.json"), evaluates="cam"),
    Run("methods", "cam", "CAM (GAP)", ("methods/cam.json",)),
    Run("methods", "cam_max", "CAM-Max", ("methods/cam_max.json",)),
    Run("methods", "cam_lse", "CAM-LSE", ("methods/cam_lse.json",)),
    Run("ablation", "fg", "FG", overrides={"loss_def#lambda_bg": 0.0, **NO_ASC}),
    Run("ablation", "fg_bg_sem", "FG + BG (SEM)", overrides=NO_ASC),
    Run("ablation", "fg_bg_eem", "FG + BG (EEM)", overrides={**NO_ASC, "loss_def#bg_term": "eem"}),
    Run("ablation", "fg_bg_asc", "FG + BG (SEM) + ASC", same_as="maxmin_sem"),
    Run("lambda", "lambda_1e-7", "lambda = 1e-7 (paper)", same_as="maxmin_sem"),
    Run("lambda", "lambda_1e-3", "lambda = 1e-3", overrides={"loss_def#lambda_bg": 1e-3}),
    Run("lambda", "lambda_1e-2", "lambda = 1e-2", overrides={"loss_def#lambda_bg": 1e-2}),
    Run("lambda", "lambda_1e-1", "lambda = 1e-1", overrides={"loss_def#lambda_bg": 1e-1}),
    Run("sigma", "sigma_paper", "sigma 0.15 + 0.001 / epoch, max 0.2 (paper)", same_as="maxmin_sem"),
    Run("sigma", "sigma_fixed", "sigma fixed at 0.15", overrides={SIGMA: "$lambda epoch: 0.15"}),
    Run("sigma", "sigma_fast", "sigma 0.15 + 0.005 / epoch, max 0.25",
        overrides={SIGMA: "$lambda epoch: min(0.15 + 0.005 * epoch, 0.25)"}),
    Run("study", "study_default", "default recipe", same_as="maxmin_sem"),
    Run("study", "pad_replicate", "encoder padding: replicate the edge", overrides={"padding_mode": "replicate"}),
    Run("study", "study_lambda_1e-1", "lambda = 1e-1", same_as="lambda_1e-1"),
    Run("study", "eval_train_scale", "default model, evaluated at the training scale (short side as trained)",
        overrides={"eval_short_side": "$@resize_short_side"}, evaluates="maxmin_sem"),
    Run("study", "eval_flips", "default model, mask averaged over 4 flips",
        overrides={"eval_flips": True}, evaluates="maxmin_sem"),
    Run("study", "eval_train_scale_flips", "default model, at the training scale and averaged over 4 flips",
        overrides={"eval_short_side": "$@resize_short_side", "eval_flips": True}, evaluates="maxmin_sem"),
    Run("study", "mask_norm_batch", "soft mask normalised over the batch in training (the authors' code)",
        overrides={"network_def#train_mask_norm": "batch"}),
    Run("study", "lr_3e-3", "learning rate 3e-3 (the paper's 1e-3 x 3)", overrides={"lr": 3e-3}),
    Run("study", "lite1", "encoder EfficientNet-lite1", overrides={"network_def#encoder": "efficientnet-lite1"}),
    Run("study", "os16", "encoder output stride 16 (last stage dilated: a map twice as fine)",
        overrides={"network_def#output_stride": 16}),
    Run("study", "size_floor_0.25", "each mask held above 25 % of its image (a barrier; the training glands' 10th "
        "percentile on benign images)", overrides={"loss_def#min_foreground": 0.25}),
    Run("study", "kmax_0.5", "WILDCAT kmax 0.5 (the top half of the map's cells make the class score; paper 0.3)",
        overrides={"network_def#wildcat#kmax": 0.5}),
    Run("study", "kmax_0.7", "WILDCAT kmax 0.7 (the top 70 % of the map's cells make the class score; paper 0.3)",
        overrides={"network_def#wildcat#kmax": 0.7}),
    Run("study", "kmax_0.5_lr_3e-3", "WILDCAT kmax 0.5 and learning rate 3e-3 (the two best single changes together)",
        overrides={"network_def#wildcat#kmax": 0.5, "lr": 3e-3}),
    Run("defaults", "maxmin_defaults", "Max-min (SEM), ours", overrides={"eval_flips": True},
        evaluates="kmax_0.5_lr_3e-3"),
    Run("defaults", "wildcat_defaults", "WILDCAT", ("methods/wildcat.json",)),
    Run("defaults", "cam_defaults", "CAM (GAP)", ("methods/cam.json",)),
    Run("study", "w_10", "mask slope w 10 (a mask nearer to binary: the classifier sees less of what it leaves out; "
        "paper 5)", overrides={"network_def#w": 10.0}),
]  # fmt: skip
GROUPS = {
    "methods": "Methods (same data, encoder, recipe and metrics; only the method's config differs)",
    "ablation": "Ablation of the max-min loss (loss switches)",
    "lambda": "Background weight lambda (SEM, with ASC)",
    "sigma": "Mask threshold schedule sigma (SEM, lambda 1e-7, with ASC)",
    "study": "The mask-quality study (max-min SEM; one change each against the default recipe)",
    "defaults": "Max-min against WILDCAT and CAM at the GlaS recipe of 2026-12-07 (lr 3e-3, max-min's kmax 0.5; "
    "masks averaged over 4 flips)",
}
COLUMNS = [  # saved metric, header, scale
    ("val_accuracy", "cl. err. (%)", "error"),
    ("val_f1_pos", "F1+ (%)", 100),
    ("val_f1_neg", "F1- (%)", 100),
    ("val_iou_pos", "IoU+ (%)", 100),
    ("val_iou_neg", "IoU- (%)", 100),
    ("val_pxap", "PxAP (%)", 100),
    ("val_fpr", "pixel FPR (%)", 100),
]


@dataclass(frozen=True)
class Job:
    run: Run
    seed: int

    def __str__(self) -> str:
        return f"{self.run.name} seed {self.seed}"


def training_order(runs: list[Run], seeds: list[int]) -> list[list[Job]]:
    """The work of ``--run`` as chains for the side-by-side runner, in the order they start.

    Seed-major: every run's first seed before any run's second, so a sweep stopped part-way (a GPU lease ending)
    leaves whole tables of the first seeds rather than many seeds of the first methods. A run that evaluates another
    run's model (Grad-CAM over the CAM model) follows that training in its chain, as soon as the model exists (a
    training already done is skipped there, so its evaluations start at once); one whose model's run is not in
    ``runs`` gets a chain of its own after the trainings."""
    trained = [r for r in runs if r.same_as is None and r.evaluates is None]
    names = {r.name for r in trained}
    dependents = [r for r in runs if r.evaluates]
    order = [[Job(r, s)] + [Job(d, s) for d in dependents if d.evaluates == r.name] for s in seeds for r in trained]
    return order + [[Job(d, s)] for s in seeds for d in dependents if d.evaluates not in names]


def recipe_of(run: Run) -> dict:
    """What ``run`` sets on top of ``recipes/glas.json``: for the "defaults" group the recipe as it is (and the
    bundle's evaluation, masks averaged over 4 flips); for every other group the recipe of its tables."""
    if run.group == "defaults":
        return {"eval_flips": True}
    return {**RECIPE_2026_11, **({} if run.configs else KMAX_2026_11)}


def run_all(args, runs: list[Run]) -> int:
    """Train and evaluate what has no evaluation yet; returns the number of runs that failed."""
    from monai_wsl.data import create_glas_datalist

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "datalist.json").is_file():
        content = create_glas_datalist(args.src, splits_dir=args.splits, seed=args.split_seed)
        (out / "datalist.json").write_text(json.dumps(content, indent=1))
    recipe = {k: v for k, v in (("max_epochs", args.max_epochs), ("crop_size", args.crop_size),
                                ("resize_short_side", args.resize_short_side)) if v is not None}  # fmt: skip
    # the tables' protocol: the mask as the network gives it (no flips) unless a run asks (the study's eval_flips)
    common = {"dataset_dir": out, "progress_bar": False, "eval_flips": False}
    if args.num_workers is not None:
        common["num_workers"] = args.num_workers
    common.update(**recipe, **dict(args.set))
    env = job_environment(args.jobs)
    by_name = {r.name: r for r in RUNS}

    def step(job: Job) -> None:
        run, root = job.run, out / job.run.name / f"seed{job.seed}"
        evaluation = root / f"eval_{args.eval_split}"
        if (evaluation / "metrics.csv").is_file() or (evaluation / "summary.json").is_file():
            print(f"[skip] {job}: {evaluation} exists", flush=True)
            return
        root.mkdir(parents=True, exist_ok=True)
        trained = by_name[run.evaluates] if run.evaluates else run
        configs = ["train.json", "recipes/glas.json", *run.configs]
        overrides = {**common, **recipe_of(trained), **trained.overrides, **run.overrides}
        overrides.update(bundle_root=root, seed=job.seed)
        checkpoint = out / trained.name / f"seed{job.seed}" / "models" / "model.pt"
        if run.evaluates is None and not (root / "train_time.json").is_file():  # no time saved: not finished
            print(f"[train] {job}", flush=True)
            seconds = run_bundle(configs, overrides, root / "train.log", env)
            (root / "train_time.json").write_text(json.dumps({"seconds": seconds, "hardware": hardware()}))
        if not checkpoint.is_file():
            raise FileNotFoundError(f"{run.name} evaluates {checkpoint}: train {trained.name} first")
        print(f"[evaluate] {job} on {args.eval_split}", flush=True)
        overrides.update(eval_split=args.eval_split, checkpoint=checkpoint, output_dir=evaluation)
        run_bundle([*configs, "evaluate.json"], overrides, root / f"eval_{args.eval_split}.log", env)
        print(f"[done] {job}", flush=True)

    return len(run_side_by_side(training_order(runs, args.seeds), args.jobs, step))


def _seed_dirs(out: Path, run: Run) -> list[tuple[int, Path]]:
    """The run's ``seed<k>`` folders as (k, folder), in seed order (seed2 before seed10)."""
    found = [(d.name[4:], d) for d in (out / (run.same_as or run.name)).glob("seed*") if d.name[4:].isdigit()]
    return sorted((int(k), d) for k, d in found)


def read_metrics(evaluation: Path) -> dict[str, float] | None:
    """The metrics saved by an evaluation: ``metrics.csv`` (MONAI's ``MetricsSaver``) or the ``summary.json`` of the
    evaluations made before the bundle used it; None when there is neither."""
    if (evaluation / "metrics.csv").is_file():
        with open(evaluation / "metrics.csv", newline="") as f:
            return {name: float(value) for name, value in csv.reader(f)}
    if (evaluation / "summary.json").is_file():
        return json.loads((evaluation / "summary.json").read_text())
    return None


def collect(out: Path, eval_split: str, runs: list[Run]) -> dict[str, dict]:
    """Per run: the list of saved metrics (one per seed found), the training times and the machines they ran on."""
    found = {}
    for run in runs:
        summaries, times, machines = [], [], set()
        for _, seed_dir in _seed_dirs(out, run):
            metrics = read_metrics(seed_dir / f"eval_{eval_split}")
            if metrics is None:
                continue
            summaries.append(metrics)
            if (seed_dir / "train_time.json").is_file():
                record = json.loads((seed_dir / "train_time.json").read_text())
                times.append(record["seconds"])
                if record.get("hardware"):
                    machines.add(record["hardware"])
        if summaries:
            found[run.name] = {"summaries": summaries, "times": times, "seeds": len(summaries), "machines": machines}
    return found


def _cell(values: list[float], scale) -> str:
    values = [100 * (1 - v) if scale == "error" else scale * v for v in values]
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "-"
    mean = float(np.mean(values))
    return f"{mean:.2f}" if len(values) == 1 else f"{mean:.2f} +- {float(np.std(values, ddof=1)):.2f}"


def _datalist_items(out: Path, eval_split: str, keys: tuple[str, ...], what: str) -> list[dict]:
    """The ``eval_split`` items of ``<out>/datalist.json``. The table itself comes from the saved evaluations; the
    reference rows and the figure also read the images and masks. When those moved, say which file and return none
    (they are skipped) instead of failing."""
    datalist = out / "datalist.json"
    items = json.loads(datalist.read_text()).get(eval_split) or [] if datalist.is_file() else []
    for item in items:
        for key in keys:
            if not Path(item[key]).is_file():
                print(
                    f"note: {what} skipped: {item[key]} (from the datalist.json of this folder) is missing; put the "
                    "data back at that path, or edit the paths in datalist.json, to get them.",
                    file=sys.stderr,
                )
                return []
    return items


def _read_mask(path: str | Path) -> np.ndarray:
    """``(H, W)`` bool: any value > 0 (0 / 255, instance ids or an RGB-saved mask)."""
    from PIL import Image

    mask = np.array(Image.open(path)) > 0
    return mask.any(-1) if mask.ndim == 3 else mask


def trivial_rows(out: Path, eval_split: str) -> list[str]:
    """The all-foreground and all-background masks on the same images, scored by the same MONAI metric functions as
    the bundle: each scores well on one of F1+ / F1- and zero on the other, which is why both, and PxAP, are
    reported (a constant map's PxAP is the foreground share)."""
    items = _datalist_items(out, eval_split, ("mask",), "the all-ones / all-zeros reference rows")
    if not items:
        return []
    import torch
    from monai.metrics import compute_confusion_matrix_metric, compute_dice, compute_iou, get_confusion_matrix

    from monai_wsl.metrics import compute_pxap

    rows = {"ones": [], "zeros": []}
    truths = []
    for item in items:
        g = torch.from_numpy(_read_mask(item["mask"]))[None, None].float()
        truths.append(g.flatten())
        for name, p in (("ones", torch.ones_like(g)), ("zeros", torch.zeros_like(g))):
            scores = [compute_dice(p, g), compute_dice(1 - p, 1 - g), compute_iou(p, g), compute_iou(1 - p, 1 - g)]
            scores.append(compute_confusion_matrix_metric("fall out", get_confusion_matrix(p, g)))
            rows[name].append(torch.cat(scores, 1)[0])  # F1+, F1-, IoU+, IoU-, FPR
    truth = torch.cat(truths)[None, None, :, None]
    pxap = float(compute_pxap(torch.full_like(truth, 0.5), truth))
    lines = []
    for name, label in (("ones", "All-ones mask (reference)"), ("zeros", "All-zeros mask (reference)")):
        f1_pos, f1_neg, iou_pos, iou_neg, fpr = torch.stack(rows[name]).nanmean(0).tolist()
        cells = [_cell([v], 100) for v in (f1_pos, f1_neg, iou_pos, iou_neg, pxap, fpr)]
        lines.append(f"| {label} | - | " + " | ".join(cells) + " | - | - |")
    return lines


def table(out: Path, eval_split: str, runs: list[Run]) -> str:
    found = collect(out, eval_split, runs)
    header = "| " + " | ".join(["Method"] + [c[1] for c in COLUMNS] + ["seeds", "train min / seed"]) + " |"
    rule = "|" + "---|" * (len(COLUMNS) + 3)
    lines = []
    for group, title in GROUPS.items():
        members = [r for r in runs if r.group == group and r.name in found]
        if not members:
            continue
        lines += [f"### {title}", "", header, rule]
        for run in members:
            data = found[run.name]
            cells = [_cell([s[key] for s in data["summaries"]], scale) for key, _, scale in COLUMNS]
            minutes = f"{np.mean(data['times']) / 60:.1f}" if data["times"] else "-"
            lines.append(f"| {run.label} | " + " | ".join(cells) + f" | {data['seeds']} | {minutes} |")
        if group == "methods":
            lines += trivial_rows(out, eval_split)
        lines.append("")
    machines = sorted(set().union(*(data["machines"] for data in found.values()))) if found else []
    lines += [f"Trained on: {machine}" for machine in machines]
    return "\n".join(lines) if lines else "no evaluation found"


def figure(out: Path, eval_split: str, runs: list[Run], num_images: int, path: Path) -> Path | None:
    """image | ground truth | each method's mask (teal, as in the bundle's overlays), for the first ``num_images``
    evaluated images.

    Each method shows its lowest evaluated seed (named in the column title unless it is seed 0), so a sweep that ran
    only later seeds still gets its columns. Every panel is scaled to one cell, so the columns stay under their
    titles whatever the images' aspect ratios."""
    import torch
    from PIL import Image, ImageDraw

    from monai_wsl.visualize import COLORS, tint, to_uint8

    columns = []
    for run in (r for r in runs if r.group == "methods"):
        for seed, folder in _seed_dirs(out, run):
            masks = sorted((folder / f"eval_{eval_split}" / "masks").glob("*_mask.png"))
            if masks:  # the lowest seed with an evaluation
                label = run.label.replace(", ours", "") + (f" (seed {seed})" if seed else "")
                columns.append((label, {m.name[: -len("_mask.png")]: m for m in masks}))
                break
    if not columns:
        return None
    items = _datalist_items(out, eval_split, ("image", "mask"), "the figure")
    items = [i for i in items if Path(i["image"]).stem in columns[0][1]][:num_images]
    if not items:
        return None
    tile, gap = 180, 4
    images = [Image.open(item["image"]).convert("RGB") for item in items]
    cell = max(tile * im.width // im.height for im in images)

    def thumb(rgb: torch.Tensor) -> np.ndarray:
        image = Image.fromarray(to_uint8(rgb))
        image = image.resize((tile * image.width // image.height, tile), Image.BILINEAR)
        out = np.full((tile, cell, 3), 255, dtype=np.uint8)
        left = (cell - image.width) // 2
        out[:, left : left + image.width] = np.array(image)
        return out

    rows = []
    for item, image in zip(items, images):
        rgb = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
        masks = [_read_mask(item["mask"])] + [_read_mask(m[Path(item["image"]).stem]) for _, m in columns]
        panels = [rgb] + [tint(rgb, torch.from_numpy(m), COLORS["pred"]) for m in masks]
        spacer = np.full((tile, gap, 3), 255, dtype=np.uint8)
        rows.append(np.concatenate([x for p in panels for x in (thumb(p), spacer)][:-1], 1))
    width = rows[0].shape[1]
    header = Image.new("RGB", (width, 22), "white")
    draw = ImageDraw.Draw(header)
    for k, title in enumerate(["image", "ground truth"] + [label for label, _ in columns]):
        draw.text((k * (cell + gap) + 4, 5), title, fill="black")
    body = [np.array(header)] + [x for r in rows for x in (r, np.full((gap, width, 3), 255, dtype=np.uint8))]
    Image.fromarray(np.concatenate(body, 0)).save(path)
    return path


def hardware() -> str:
    import os

    import torch

    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").is_file():
        names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
        cpu = names[0] if names else cpu
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {gpu}; torch {torch.__version__}, Python {platform.python_version()}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder of the runs (created)")
    parser.add_argument("--src", help="GlaS folder (Grade.csv, images, *_anno masks); needed with --run")
    parser.add_argument("--splits", help="folder with fold0_train.csv / fold0_valid.csv (default: <src>/splits)")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the split when there are no fold files")
    parser.add_argument("--run", action="store_true", help="train and evaluate the runs that have no evaluation yet")
    parser.add_argument("--groups", default="methods,ablation,lambda,sigma", help=f"comma list of {list(GROUPS)}")
    parser.add_argument("--runs", help="comma list of run names to keep within the groups (default: all)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--eval-split", default="validation", choices=["validation", "test"])
    parser.add_argument("--max-epochs", type=int, help="override the recipe's 80 epochs")
    parser.add_argument("--crop-size", type=int, help="override the recipe's 416 crops")
    parser.add_argument("--resize-short-side", type=int, help="override the recipe's 432")
    parser.add_argument(
        "--num-workers", type=int, help="the DataLoader's workers per training (default: the bundle's, 0 on CPUs)"
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="trainings run at once (e.g. 6 on one large GPU), every run's first seed before any second; each gets "
        "cores // jobs CPU threads unless OMP_NUM_THREADS is set",
    )
    parser.add_argument("--figure-images", type=int, default=4)
    parser.add_argument(
        "--set",
        action="append",
        type=setting,
        default=[],
        metavar="KEY=VALUE",
        help="a bundle override for every run, e.g. --set fold_padding=true --set 'memory_format=$torch.channels_last' "
        "(the CPU speed switches) or --set snapshot_interval=1; a run's own overrides win",
    )
    return parser


def setting(item: str) -> tuple[str, str]:
    """``"KEY=VALUE"`` -> ``(KEY, VALUE)`` (the value may hold ``=``); anything else is a usage error naming it."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"{item!r}: give KEY=VALUE, e.g. --set fold_padding=true")
    return key.strip(), value


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    if args.jobs < 1:
        parser.error(f"--jobs {args.jobs}: give the number of trainings to run at once, 1 or more")
    groups = [g.strip() for g in args.groups.split(",") if g.strip()]
    if set(groups) - set(GROUPS):
        parser.error(f"unknown groups {sorted(set(groups) - set(GROUPS))}; choose from {list(GROUPS)}")
    runs = [r for r in RUNS if r.group in groups]
    if args.runs:
        names = {n.strip() for n in args.runs.split(",") if n.strip()}
        if names - {r.name for r in RUNS}:
            parser.error(f"unknown runs {sorted(names - {r.name for r in RUNS})}; choose from {[r.name for r in RUNS]}")
        runs = [r for r in runs if r.name in names]
    selected = list(runs)  # what the table shows; below, the runs they reuse or evaluate are added
    needed = {r.same_as for r in runs if r.same_as} | {r.evaluates for r in runs if r.evaluates}
    runs += [r for r in RUNS if r.name in needed and r not in runs]
    out = Path(args.out)
    failed = 0
    if args.run:
        if not args.src:
            parser.error("--run needs --src (the GlaS folder)")
        failed = run_all(args, runs)
    text = table(out, args.eval_split, selected)
    print(text)
    (out / f"table_{args.eval_split}.md").write_text(text + "\n")
    picture = figure(out, args.eval_split, selected, args.figure_images, out / f"masks_{args.eval_split}.png")
    if picture:
        print(f"\nfigure: {picture}")
    print(f"this machine: {hardware()}")
    if failed:
        raise SystemExit(f"{failed} run(s) failed (their logs are in {out}); the table holds the others")


if __name__ == "__main__":
    main()
