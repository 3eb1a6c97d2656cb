r"""Reproduce the paper's comparison through the bundle: train and evaluate every method and variant on GlaS, then
write the table (and a figure of masks) in the paper's form.

Every run is the bundle's own ``train.json`` (+ ``evaluate.json``) with one override set, so runs differ only in
the method or the loss switch. Each lives in ``<out>/<run>/seed<k>/`` (models, TensorBoard logs, evaluations);
the table is read back from the saved ``summary.json`` / ``per_image.csv`` files, so a second call without ``--run``
regenerates it.

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
import json
import math
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"


@dataclass
class Run:
    group: str
    name: str
    label: str
    train: dict = field(default_factory=dict)  # bundle overrides for training (and evaluation)
    same_as: str | None = None  # reuse another run's evaluations (the same training)
    weights_of: str | None = None  # evaluate another run's trained model with these overrides
    evaluate: dict = field(default_factory=dict)


RUNS = [
    Run("methods", "maxmin_sem", "Max-min (SEM), ours", {"method": "maxmin"}),
    Run("methods", "maxmin_eem", "Max-min (EEM), ours", {"method": "maxmin", "loss_def#bg_term": "eem"}),
    Run("methods", "deepmil", "Deep MIL (attention)", {"method": "deepmil"}),
    Run("methods", "wildcat", "WILDCAT", {"method": "wildcat"}),
    Run("methods", "gradcam", "Grad-CAM", weights_of="cam", evaluate={"method": "gradcam"}),
    Run("methods", "gradcampp", "Grad-CAM++", weights_of="cam", evaluate={"method": "gradcampp"}),
    Run("methods", "cam", "CAM (GAP)", {"method": "cam"}),
    Run("methods", "cam_max", "CAM-Max", {"method": "cam_max"}),
    Run("methods", "cam_lse", "CAM-LSE", {"method": "cam_lse"}),
    Run("ablation", "fg", "FG", {"method": "maxmin", "loss_def#lambda_bg": 0.0, "loss_def#size_constraint": False}),
    Run("ablation", "fg_bg_sem", "FG + BG (SEM)", {"method": "maxmin", "loss_def#size_constraint": False}),
    Run(
        "ablation",
        "fg_bg_eem",
        "FG + BG (EEM)",
        {"method": "maxmin", "loss_def#size_constraint": False, "loss_def#bg_term": "eem"},
    ),
    Run("ablation", "fg_bg_asc", "FG + BG (SEM) + ASC", same_as="maxmin_sem"),
    Run("lambda", "lambda_1e-7", "lambda = 1e-7 (paper)", same_as="maxmin_sem"),
    Run("lambda", "lambda_1e-3", "lambda = 1e-3", {"method": "maxmin", "loss_def#lambda_bg": 1e-3}),
    Run("lambda", "lambda_1e-2", "lambda = 1e-2", {"method": "maxmin", "loss_def#lambda_bg": 1e-2}),
    Run("lambda", "lambda_1e-1", "lambda = 1e-1", {"method": "maxmin", "loss_def#lambda_bg": 1e-1}),
    Run("sigma", "sigma_paper", "sigma 0.15 + 0.001 / epoch, max 0.2 (paper)", same_as="maxmin_sem"),
    Run("sigma", "sigma_fixed", "sigma fixed at 0.15", {"method": "maxmin", "sigma_step": 0.0}),
    Run(
        "sigma",
        "sigma_fast",
        "sigma 0.15 + 0.005 / epoch, max 0.25",
        {"method": "maxmin", "sigma_step": 0.005, "sigma_max": 0.25},
    ),
]
GROUPS = {
    "methods": "Methods (same data, encoder, recipe and metrics; only --method differs)",
    "ablation": "Ablation of the max-min loss (loss switches)",
    "lambda": "Background weight lambda (SEM, with ASC)",
    "sigma": "Mask threshold schedule sigma (SEM, lambda 1e-7, with ASC)",
}
COLUMNS = [  # summary.json key, header, scale
    ("val_accuracy", "cl. err. (%)", "error"),
    ("val_f1_pos", "F1+ (%)", 100),
    ("val_f1_neg", "F1- (%)", 100),
    ("val_iou_pos", "IoU+ (%)", 100),
    ("val_iou_neg", "IoU- (%)", 100),
    ("val_pxap", "PxAP (%)", 100),
    ("val_fpr", "pixel FPR (%)", 100),
]


def _by_name() -> dict[str, Run]:
    return {r.name: r for r in RUNS}


def _arg(value) -> str:
    return repr(value) if isinstance(value, bool) else str(value)


def usable_cpus() -> int:
    """The CPU cores this process may run on (its affinity set where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def job_environment(jobs: int, environ: dict | None = None) -> dict:
    """The environment of one of ``jobs`` bundle runs that share the machine.

    Each PyTorch process starts one intra-op thread per core; several trainings side by side (``--jobs 7`` on one
    GPU) then run ``jobs`` times more threads than cores and stall each other: seven trainings on a 16-core H200
    machine took 30 to 63 s per epoch, 2 to 3 s with two threads each (docs/results.md). Each job gets an equal
    share of the cores instead, unless ``OMP_NUM_THREADS`` is already set."""
    env = dict(os.environ if environ is None else environ)
    if jobs > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, usable_cpus() // jobs))
    return env


def _bundle(config_files: list[str], overrides: dict, log: Path, env: dict | None = None) -> float:
    """Run the bundle in a subprocess (as a user would), logging to ``log``; returns the wall time."""
    configs = str(config_files[0]) if len(config_files) == 1 else "[" + ",".join(f"'{c}'" for c in config_files) + "]"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", configs]
    cmd += ["--meta_file", str(CONFIGS / "metadata.json"), "--logging_file", str(CONFIGS / "logging.conf")]
    for key, value in overrides.items():
        cmd += [f"--{key}", _arg(value)]
    start = time.perf_counter()
    with open(log, "w") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    if done.returncode:
        raise RuntimeError(f"bundle run failed (exit {done.returncode}): see {log}")
    return time.perf_counter() - start


def run_all(args, runs: list[Run]) -> int:
    """Train and evaluate what has no evaluation yet; returns the number of runs that failed."""
    from monai_wsl.data import create_glas_datalist

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    datalist = out / "datalist.json"
    if not datalist.is_file():
        content = create_glas_datalist(args.src, splits_dir=args.splits, seed=args.split_seed)
        datalist.write_text(json.dumps(content, indent=1))
    recipe = {k: v for k, v in (("max_epochs", args.max_epochs), ("crop_size", args.crop_size),
                                ("resize_short_side", args.resize_short_side)) if v is not None}  # fmt: skip
    common = {"dataset_dir": datalist, "progress_bar": False, "num_workers": args.num_workers, **recipe}
    by_name = _by_name()
    env = job_environment(args.jobs)

    def one(run: Run, seed: int) -> None:
        root = out / run.name / f"seed{seed}"
        summary = root / f"eval_{args.eval_split}" / "summary.json"
        if summary.is_file():
            print(f"[skip] {run.name} seed {seed}: {summary} exists", flush=True)
            return
        root.mkdir(parents=True, exist_ok=True)
        if run.weights_of is None:
            overrides = {**common, **run.train, "bundle_root": root, "seed": seed}
            if not (root / "train_time.json").is_file():  # no time saved: the training did not finish
                print(f"[train] {run.name} seed {seed}", flush=True)
                seconds = _bundle([str(CONFIGS / "train.json")], overrides, root / "train.log", env)
                (root / "train_time.json").write_text(json.dumps({"seconds": seconds, "hardware": hardware()}))
            checkpoint = root / "models" / "model.pt"
        else:
            source = by_name[run.weights_of]
            overrides = {**common, **source.train, **run.evaluate, "bundle_root": root, "seed": seed}
            checkpoint = out / source.name / f"seed{seed}" / "models" / "model.pt"
            if not checkpoint.is_file():
                raise FileNotFoundError(f"{run.name} evaluates {checkpoint}: train {source.name} first")
        print(f"[evaluate] {run.name} seed {seed} on {args.eval_split}", flush=True)
        evaluation = {**overrides, **run.evaluate, "eval_split": args.eval_split, "checkpoint": checkpoint}
        evaluation["output_dir"] = root / f"eval_{args.eval_split}"
        configs = [str(CONFIGS / "train.json"), str(CONFIGS / "evaluate.json")]
        _bundle(configs, evaluation, root / f"eval_{args.eval_split}.log", env)
        print(f"[done] {run.name} seed {seed}", flush=True)

    failures = []

    def chain(jobs: list[Run], seed: int) -> None:
        """A training, then the evaluations of its model by other methods (Grad-CAM over CAM), in one slot."""
        for run in jobs:
            try:
                one(run, seed)
            except (RuntimeError, FileNotFoundError) as error:  # the others go on; reported at the end
                print(f"[failed] {run.name} seed {seed}: {error}", flush=True)
                failures.append(error)
                if run.weights_of is None:  # its dependents have no model to evaluate
                    for skipped in jobs[1:]:
                        print(f"[skipped] {skipped.name} seed {seed}: {run.name} has no model", flush=True)
                    return

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for future in [pool.submit(chain, jobs, seed) for jobs, seed in training_order(runs, args.seeds)]:
            future.result()
    return len(failures)


def training_order(runs: list[Run], seeds: list[int]) -> list[tuple[list[Run], int]]:
    """The work of ``--run`` as slots for the ``--jobs`` pool, in the order they start.

    Seed-major: every run's first seed before any run's second, so a sweep stopped part-way (a GPU lease ending)
    leaves whole tables of the first seeds rather than many seeds of the first methods. A run that evaluates another
    run's model (Grad-CAM over the CAM model) follows that training in its slot, as soon as the model exists (a
    training already done is skipped there, so its evaluations start at once); one whose model's run is not in
    ``runs`` gets a slot of its own after the trainings."""
    trained = [r for r in runs if r.same_as is None and r.weights_of is None]
    names = {r.name for r in trained}
    dependents = [r for r in runs if r.weights_of]
    order = []
    for seed in seeds:
        for run in trained:
            order.append(([run] + [d for d in dependents if d.weights_of == run.name], seed))
    for seed in seeds:
        order += [([d], seed) for d in dependents if d.weights_of not in names]
    return order


def _results_dir(out: Path, run: Run) -> Path:
    return out / (run.same_as or run.name)


def _seed_dirs(out: Path, run: Run) -> list[tuple[int, Path]]:
    """The run's ``seed<k>`` folders as (k, folder), in seed order (seed2 before seed10)."""
    found = [(d.name[4:], d) for d in _results_dir(out, run).glob("seed*") if d.name[4:].isdigit()]
    return sorted((int(k), d) for k, d in found)


def collect(out: Path, eval_split: str, runs: list[Run]) -> dict[str, dict]:
    """Per run: the list of summaries (one per seed found), the training times and the machines they ran on."""
    found = {}
    for run in runs:
        summaries, times, machines = [], [], set()
        for _, seed_dir in _seed_dirs(out, run):
            summary = seed_dir / f"eval_{eval_split}" / "summary.json"
            if summary.is_file():
                summaries.append(json.loads(summary.read_text()))
                timing = seed_dir / "train_time.json"
                if timing.is_file():
                    record = json.loads(timing.read_text())
                    times.append(record["seconds"])
                    if record.get("hardware"):
                        machines.add(record["hardware"])
        if summaries:
            found[run.name] = {"summaries": summaries, "times": times, "seeds": len(summaries), "machines": machines}
    return found


def _cell(values: list[float], scale) -> str:
    if scale == "error":
        values = [100 * (1 - v) for v in values]
    else:
        values = [scale * v for v in values]
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "-"
    mean = float(np.mean(values))
    return f"{mean:.2f}" if len(values) == 1 else f"{mean:.2f} +- {float(np.std(values, ddof=1)):.2f}"


def _data_missing(items: list[dict], keys: tuple[str, ...], what: str) -> bool:
    """The table itself comes from the saved evaluations; the reference rows and the figure also read the images and
    masks named in ``<out>/datalist.json``. When those moved, say which file and skip them instead of failing."""
    for item in items:
        for key in keys:
            if not Path(item[key]).is_file():
                print(
                    f"note: {what} skipped: {item[key]} (from the datalist.json of this folder) is missing; put the "
                    "data back at that path, or edit the paths in datalist.json, to get them.",
                    file=sys.stderr,
                )
                return True
    return False


def trivial_rows(out: Path, eval_split: str) -> list[str]:
    """The all-foreground and all-background masks on the same images, scored by the same metric code as the
    methods: each scores well on one of F1+ / F1- and zero on the other, which is why both, and PxAP, are reported
    (a constant map's PxAP is the foreground share)."""
    datalist = out / "datalist.json"
    items = json.loads(datalist.read_text()).get(eval_split) or [] if datalist.is_file() else []
    if not items or _data_missing(items, ("mask",), "the all-ones / all-zeros reference rows"):
        return []
    import torch
    from PIL import Image

    from monai_wsl.metrics import compute_pixel_f1, compute_pixel_fpr, compute_pixel_iou, compute_pxap

    rows = {"ones": [], "zeros": []}
    truths = []
    for item in items:
        g = np.array(Image.open(item["mask"])) > 0
        g = torch.from_numpy(g.any(-1) if g.ndim == 3 else g)[None, None].float()
        truths.append(g.flatten())
        for name, p in (("ones", torch.ones_like(g)), ("zeros", torch.zeros_like(g))):
            scores = [compute_pixel_f1(p, g), compute_pixel_iou(p, g), compute_pixel_fpr(p, g)]
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
    """image | ground truth | each method's mask, for the first ``num_images`` evaluated images.

    Each method shows its lowest evaluated seed (named in the column title unless it is seed 0), so a sweep that ran
    only later seeds still gets its columns."""
    from PIL import Image, ImageDraw

    members = [r for r in runs if r.group == "methods"]
    columns = []
    for run in members:
        for seed, folder in _seed_dirs(out, run):
            masks = sorted((folder / f"eval_{eval_split}" / "masks").glob("*_mask.png"))
            if masks:  # the lowest seed with an evaluation
                label = run.label.replace(", ours", "") + (f" (seed {seed})" if seed else "")
                columns.append((label, {m.name[: -len("_mask.png")]: m for m in masks}))
                break
    datalist = out / "datalist.json"
    if not columns or not datalist.is_file():
        return None
    items = [i for i in json.loads(datalist.read_text()).get(eval_split, []) if Path(i["image"]).stem in columns[0][1]]
    items = items[:num_images]
    if _data_missing(items, ("image", "mask"), "the figure"):
        return None
    tile, gap = 180, 4
    teal = np.array([0, 190, 215], dtype=np.float32)
    images = [Image.open(item["image"]) for item in items]
    # One cell size for the whole grid, so that every column sits under its title whatever the images' aspect ratios:
    # each panel is scaled to the cell's height; the cell is as wide as the widest result, narrower panels are centred.
    cell = max(tile * im.width // im.height for im in images)

    def thumb(array: np.ndarray) -> np.ndarray:
        image = Image.fromarray(array.astype(np.uint8))
        image = image.resize((tile * image.width // image.height, tile), Image.BILINEAR)
        out = np.full((tile, cell, 3), 255, dtype=np.uint8)
        left = (cell - image.width) // 2
        out[:, left : left + image.width] = np.array(image)
        return out

    rows = []
    for item, image in zip(items, images):
        rgb = np.array(image.convert("RGB")).astype(np.float32)
        gt = np.array(Image.open(item["mask"])) > 0
        gt = gt.any(-1) if gt.ndim == 3 else gt
        panels = [rgb, np.where(gt[..., None], 0.55 * rgb + 0.45 * teal, rgb)]
        for _, masks in columns:
            m = np.array(Image.open(masks[Path(item["image"]).stem])) > 0
            panels.append(np.where(m[..., None], 0.55 * rgb + 0.45 * teal, rgb))
        spacer = np.full((tile, gap, 3), 255, dtype=np.uint8)
        rows.append(np.concatenate([x for p in panels for x in (thumb(p), spacer)][:-1], 1))
    width = rows[0].shape[1]
    titles = ["image", "ground truth"] + [label for label, _ in columns]
    header = Image.new("RGB", (width, 22), "white")
    draw = ImageDraw.Draw(header)
    for k, title in enumerate(titles):
        draw.text((k * (cell + gap) + 4, 5), title, fill="black")
    body = [np.array(header)] + [x for r in rows for x in (r, np.full((gap, width, 3), 255, dtype=np.uint8))]
    Image.fromarray(np.concatenate(body, 0)).save(path)
    return path


def hardware() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    import torch

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
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="trainings run at once (e.g. 6 on one large GPU), every run's first seed before any second; each gets "
        "cores // jobs CPU threads unless OMP_NUM_THREADS is set",
    )
    parser.add_argument("--figure-images", type=int, default=4)
    return parser


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    if args.jobs < 1:
        parser.error(f"--jobs {args.jobs}: give the number of trainings to run at once, 1 or more")
    groups = [g.strip() for g in args.groups.split(",") if g.strip()]
    unknown = set(groups) - set(GROUPS)
    if unknown:
        parser.error(f"unknown groups {sorted(unknown)}; choose from {list(GROUPS)}")
    runs = [r for r in RUNS if r.group in groups]
    if args.runs:
        names = {n.strip() for n in args.runs.split(",") if n.strip()}
        unknown = names - {r.name for r in RUNS}
        if unknown:
            parser.error(f"unknown runs {sorted(unknown)}; choose from {[r.name for r in RUNS]}")
        runs = [r for r in runs if r.name in names]
    selected = list(runs)  # what the table shows; below, the runs they reuse or evaluate are added
    needed = {r.same_as for r in runs if r.same_as} | {r.weights_of for r in runs if r.weights_of}
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
