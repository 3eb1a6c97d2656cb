"""A trained max-min run, looked at again without training: which epoch each selection rule picks, and what other
rules for turning the localizer's map into a mask would score, on the same validation images.

    python scripts/mask_study.py --run runs/study/maxmin_sem/seed0 --datalist runs/study/datalist.json

1. Model selection, from the per-epoch validation metrics the bundle logs (``train.log``): best accuracy with ties
   to the later epoch (the paper's rule, the bundle's ``model.pt``), best PxAP (B-LOC, which uses the validation
   masks), best accuracy then PxAP, and the last epoch.
2. Mask rules, on the selected model (``models/model.pt``) and, where the run kept ``--snapshot_interval`` weights,
   on each rule's epoch: the bundle's mask ``M >= 0.5`` (``A_norm >= sigma``); ``M`` averaged over four flips;
   ``A_norm >= tau`` for other thresholds; a percentile min-max instead of min-max (one peak no longer sets the
   scale); and the localizer's evidence for its class, ``A_c - max_other A_k``: its score map has no per-image
   normalisation (PxAP pools the images' pixels as they are), its mask is ``> 0`` or, min-max normalised, ``>= sigma``;
   with ``--shifts 16``, ``M`` averaged over the flips and over half-cell phases of the encoder's grid as well.
   Each with F1+, F1-, PxAP (pooled, binned as the bundle's) and the mask's share of the image against the glands'
   share, by class.

3. With ``--views``, what the max-min principle asks of the classifier: its probability of the true class on the
   image, the masked image, its complement, and the same with the glands as the mask. With ``--ceiling 32``, what a
   perfect map on the encoder's 32-pixel grid scores (the glands pooled to the grid): the resolution's own limit.

Images and masks are read and scaled as the bundle's validation reads them; the default rule reproduces the
bundle's validation metrics of the same weights.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from script_args import study_parser

METRICS_LINE = re.compile(r"Epoch\[(\d+)\] Metrics -- (.*val_accuracy.*)$")


def epoch_metrics(train_log: str | Path) -> dict[int, dict[str, float]]:
    """``{epoch: {metric: value}}`` of the validation lines (``Epoch[N] Metrics -- val_...``) of a bundle log; a
    resumed run's later line for an epoch wins."""
    found: dict[int, dict[str, float]] = {}
    for line in Path(train_log).read_text().splitlines():
        match = METRICS_LINE.search(line)
        if match:
            pairs = re.findall(r"(\w+): ([-+0-9.eE]+|nan)", match.group(2))
            found[int(match.group(1))] = {k: float(v) for k, v in pairs}
    return found


def select_epochs(metrics: dict[int, dict[str, float]]) -> dict[str, int]:
    """The epoch each selection rule picks (ties to the later epoch, as the bundle's saver)."""
    if not metrics:
        raise ValueError("no validation metrics: the log holds no 'Epoch[N] Metrics -- val_accuracy ...' line")
    epochs = sorted(metrics)

    def best(key) -> int:
        return max(epochs, key=lambda e: (key(metrics[e]), e))

    top = max(m["val_accuracy"] for m in metrics.values())
    return {
        "accuracy (paper)": best(lambda m: m["val_accuracy"]),
        "PxAP (B-LOC)": best(lambda m: m["val_pxap"]),
        "accuracy, then PxAP": best(lambda m: (m["val_accuracy"] == top, m["val_pxap"])),
        "last epoch": epochs[-1],
    }


def _flip(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    return x.flip(dims) if dims else x


def percentile_normalize(maps: torch.Tensor, low: float = 0.01, high: float = 0.99) -> torch.Tensor:
    """Per-image min-max normalisation between the ``low`` and ``high`` quantiles, clipped to [0, 1]."""
    flat = maps.flatten(1).float()
    lo, hi = torch.quantile(flat, low, dim=1), torch.quantile(flat, high, dim=1)
    shape = (-1,) + (1,) * (maps.ndim - 1)
    return ((maps - lo.view(shape)) / (hi - lo).clamp_min(1e-8).view(shape)).clamp(0, 1)


def shifted_flip_mask(net, x: torch.Tensor, size, shift: int) -> torch.Tensor:
    """``M`` averaged over the four flips and the grid phases ``{0, shift}`` on each axis: ``x`` reflect-padded by
    ``shift`` pixels at the top and / or left (the image meets the encoder's stride-32 grid half a cell further on),
    each mask cropped back and upsampled to ``size``; ``(1, 1, *size)``."""
    import itertools

    import torch.nn.functional as F

    from monai_wsl.networks.blocks.soft_mask import soft_mask
    from monai_wsl.networks.utils import spatial_flips, upsample

    sigma, w = float(net.sigma), float(net.w)
    masks = []
    for dy, dx in itertools.product((0, shift), repeat=2):
        xp = F.pad(x, (dx, 0, dy, 0), mode="reflect") if dy or dx else x
        for d in spatial_flips(2):
            with torch.no_grad():
                scores, maps = net.localize(_flip(xp, d))[:2]
            m = soft_mask(_flip(maps, d), scores, xp.shape[2:], sigma, w)[..., dy:, dx:]
            masks.append(upsample(m, size))
    return torch.stack(masks).mean(0)


def mask_rules(
    net, x: torch.Tensor, thresholds: list[float], short_side: int | None = None, shift: int = 0
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{rule: (score map in [0, 1], binary mask)}``, each ``(1, 1, *spatial)`` at the size of ``x`` ``(1, C,
    *spatial)``; the network sees ``x`` resized to ``short_side`` as ``WSLInferer(short_side)`` resizes it (its map
    is upsampled to ``x``'s size directly). ``shift`` > 0 (2D) adds ``M`` averaged over flips and grid phases
    (:func:`shifted_flip_mask`)."""
    from monai_wsl.networks.blocks.soft_mask import soft_mask
    from monai_wsl.networks.utils import minmax_normalize, spatial_flips, upsample
    from monai_wsl.transforms import ResizeShortSide

    sigma, w = float(net.sigma), float(net.w)
    size = x.shape[2:]
    x_in = x if short_side is None else ResizeShortSide(short_side)(x[0])[None]
    with torch.no_grad():
        outputs = [net.localize(_flip(x_in, d))[:2] for d in spatial_flips(x.ndim - 2)]
    views = [(s, _flip(m, d)) for (s, m), d in zip(outputs, spatial_flips(x.ndim - 2))]
    scores, maps = views[0]
    mask = soft_mask(maps, scores, size, sigma, w)
    averaged = torch.stack([soft_mask(m, s, size, sigma, w) for s, m in views]).mean(0)
    probs = scores.softmax(1).view(*scores.shape, *([1] * (maps.ndim - 2)))
    mixed = upsample((probs * maps).sum(1, keepdim=True), size)
    a_norm = minmax_normalize(mixed)
    robust = torch.sigmoid(w * (percentile_normalize(mixed) - sigma))
    c = int(scores.argmax(1))
    others = torch.cat([maps[:, :c], maps[:, c + 1 :]], 1).amax(1, keepdim=True)
    evidence = upsample(maps[:, c : c + 1] - others, size)
    rules = {
        "M >= 0.5 (the bundle's)": (mask, mask >= 0.5),
        "M averaged over flips >= 0.5": (averaged, averaged >= 0.5),
        "percentile (1-99 %) min-max, sigmoid >= 0.5": (robust, robust >= 0.5),
        "evidence A_c - A_other > 0 (no normalisation)": (torch.sigmoid(evidence), evidence > 0),
        "evidence, min-max, >= sigma": (torch.sigmoid(evidence), minmax_normalize(evidence) >= sigma),
    }
    if shift:
        shifted = shifted_flip_mask(net, x_in, size, shift)
        rules[f"M averaged over flips and shifts 0 / {shift} >= 0.5"] = (shifted, shifted >= 0.5)
    for tau in thresholds:
        rules[f"A_norm >= {tau:g}"] = (mask, a_norm >= tau)
    return rules


def read_image(item: dict) -> torch.Tensor:
    """The item's image as the bundle's validation gives it to the network: ``(1, 3, H, W)`` in [-1, 1]."""
    from monai.transforms import EnsureChannelFirst, LoadImage

    image = EnsureChannelFirst()(LoadImage(image_only=True)(item["image"])).as_tensor().float()
    if image.shape[0] == 1:
        image = image.expand(3, *image.shape[1:])
    return (image[:3] / 127.5 - 1)[None]


def read_glands(item: dict) -> torch.Tensor:
    """The item's gland mask, binarised (instance ids > 0): ``(1, 1, H, W)``."""
    from monai.transforms import EnsureChannelFirst, LoadImage

    return (EnsureChannelFirst()(LoadImage(image_only=True)(item["mask"])).as_tensor()[:1] > 0).float()[None]


def evaluate_rules(
    net, items: list[dict], thresholds: list[float], short_sides: list[int | None], shift: int = 0
) -> dict[str, dict[str, float]]:
    """Per rule and input scale (``None``: the image as it is, the bundle's; else resized so that its short side
    is that many pixels, the mask scored at the image's own size): mean F1+ / F1- over images, pooled binned PxAP,
    and the mean mask / ground-truth share by class."""
    per_rule: dict[str, dict] = {}
    for item in items:
        x, truth = read_image(item), read_glands(item)
        label = int(item["label"])
        for short in short_sides:
            where = "as is" if short is None else f"short side {short}"
            for name, (score, seg) in mask_rules(net, x, thresholds, short, shift).items():
                record(per_rule, f"{name}, {where}", score, seg, truth, label)
    return summarise(per_rule)


VIEWS = ("x", "x * M", "x * (1 - M)", "x * G", "x * (1 - G)")


def classifier_views(net, items: list[dict]) -> dict[int, dict[str, float]]:
    """What the max-min principle asks of the classifier, measured: by class, the mean probability it gives the true
    class on the image ``x``, on the masked image ``x * M`` and its complement ``x * (1 - M)`` (``M`` the soft mask,
    as the loss sees it), and on the same with the glands ``G`` (the ground truth) as the mask. The complement should
    leave the classifier uncertain (1 / K); where ``x * (1 - M)`` is classified as surely as ``x``, the complement
    still shows the class and nothing in the loss asks the mask to take the rest of it."""
    seen: dict[int, list[list[float]]] = {}
    with torch.no_grad():
        for item in items:
            x, glands = read_image(item), read_glands(item)
            mask, label = net.segment(x), int(item["label"])
            views = (x, x * mask, x * (1 - mask), x * glands, x * (1 - glands))
            seen.setdefault(label, []).append([float(net.classify(v).softmax(1)[0, label]) for v in views])
    return {label: dict(zip(VIEWS, torch.tensor(rows).mean(0).tolist())) for label, rows in sorted(seen.items())}


def grid_ceiling(items: list[dict], strides: list[int]) -> dict[str, dict[str, float]]:
    """The best a map on a grid of ``stride`` pixels can score: the glands' share of each cell (the ground truth
    area-pooled to the grid), upsampled bilinearly as the network's map is, as the score; ``>= 0.5`` as the mask."""
    import torch.nn.functional as F

    per_rule: dict[str, dict] = {}
    for item in items:
        truth = read_glands(item)
        for stride in strides:
            cells = F.avg_pool2d(truth, stride, stride, ceil_mode=True)
            score = F.interpolate(cells, size=truth.shape[2:], mode="bilinear", align_corners=False)
            record(per_rule, f"the glands on a {stride}-pixel grid", score, score >= 0.5, truth, int(item["label"]))
    return summarise(per_rule)


def record(per_rule: dict, name: str, score, seg, truth, label: int) -> None:
    """Add one image's scores under ``name``."""
    from monai.metrics import compute_dice

    from monai_wsl.metrics import PixelAPMetric

    r = per_rule.setdefault(name, {"f1_pos": [], "f1_neg": [], "pxap": PixelAPMetric(), "share": {}})
    seg = seg.float()
    r["f1_pos"].append(float(compute_dice(seg, truth)))
    r["f1_neg"].append(float(compute_dice(1 - seg, 1 - truth)))
    r["pxap"](y_pred=score.clamp(0, 1), y=truth)
    r["share"].setdefault(label, []).append((float(seg.mean()), float(truth.mean())))


def summarise(per_rule: dict) -> dict[str, dict[str, float]]:
    out = {}
    for name, r in per_rule.items():
        row = {
            "f1_pos": float(torch.tensor(r["f1_pos"]).nanmean()),
            "f1_neg": float(torch.tensor(r["f1_neg"]).nanmean()),
            "pxap": float(r["pxap"].aggregate()),
        }
        for label, pairs in sorted(r["share"].items()):
            row[f"mask_share_{label}"] = sum(p[0] for p in pairs) / len(pairs)
            row[f"truth_share_{label}"] = sum(p[1] for p in pairs) / len(pairs)
        out[name] = row
    return out


def load_network(checkpoint: Path, encoder: str | None = None, output_stride: int | None = None):
    """The network ``checkpoint`` was trained as (its model card's ``network_def``; a card from before it recorded one:
    a max-min network with ``encoder``, default EfficientNet-lite0, and ``output_stride``), its weights loaded."""
    from monai_wsl.model_card import load_trained_network

    given = {"encoder": encoder} if encoder else {}
    given.update({"output_stride": output_stride} if output_stride else {})
    return load_trained_network(checkpoint, without_card={"encoder": "efficientnet-lite0"}, **given)


def print_rules(title: str, rows: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    labels = sorted({k.rsplit("_", 1)[1] for row in rows.values() for k in row if k.startswith("mask_share_")})
    shares = " | ".join(f"mask / glands, class {c}" for c in labels)
    print(f"\n{title}\n")
    print(f"| mask rule | F1+ | F1- | PxAP | {shares} |\n|---|---|---|---|" + "---|" * len(labels))
    for rule, row in rows.items():
        cells = [_pct(row[k]) for k in ("f1_pos", "f1_neg", "pxap")]
        cells += [f"{_pct(row[f'mask_share_{c}'])} / {_pct(row[f'truth_share_{c}'])}" for c in labels]
        print(f"| {rule} | " + " | ".join(cells) + " |")
    return rows


def print_views(views: dict[int, dict[str, float]]) -> dict[int, dict[str, float]]:
    print("\nthe classifier's probability of each image's true class, mean by class\n")
    print("| class | " + " | ".join(VIEWS) + " |\n|---|" + "---|" * len(VIEWS))
    for label, row in views.items():
        print(f"| {label} | " + " | ".join(f"{row[v]:.3f}" for v in VIEWS) + " |")
    return views


def _pct(v: float) -> str:
    return f"{100 * v:.1f}"


def main() -> None:
    parser = study_parser(__doc__, "--run", "a bundle_root of a max-min training (train.log, models/)")
    parser.add_argument("--log", help="the training's output (default: <run>/train.log, as report.py writes it)")
    parser.add_argument(
        "--output-stride",
        type=int,
        help="default: the model card's, else 32 (a card from before it recorded the network: the weights of a "
        "dilated encoder do not tell its stride)",
    )
    parser.add_argument("--thresholds", type=float, nargs="*", default=[0.1, 0.15, 0.3, 0.4])
    parser.add_argument(
        "--short-sides",
        type=int,
        nargs="*",
        default=[432],
        help="also run the network on the images resized to these short sides (the recipe trains at 432)",
    )
    parser.add_argument(
        "--epochs",
        type=int,
        nargs="*",
        help="only these epochs' snapshots (default: model.pt and each rule's epoch)",
    )
    parser.add_argument(
        "--shifts",
        type=int,
        default=0,
        metavar="PIXELS",
        help="also average M over flips and the grid phases 0 and PIXELS on each axis (16: half a cell of the "
        "stride-32 map; 16 passes of the localizer per image)",
    )
    parser.add_argument(
        "--views",
        action="store_true",
        help="also the classifier's probability of the true class on x, x * M, x * (1 - M), x * G and x * (1 - G)",
    )
    parser.add_argument(
        "--ceiling",
        type=int,
        nargs="*",
        default=[],
        metavar="STRIDE",
        help="also what a perfect map on grids of these strides scores (the ground truth pooled to the grid)",
    )
    parser.add_argument("--json", help="write everything to this file")
    args = parser.parse_args()

    from monai_wsl.data import load_datalist

    run = Path(args.run)
    log = Path(args.log) if args.log else run / "train.log"
    if not log.is_file():
        parser.error(f"{log} not found: give the training's output with --log (the bundle prints it to stdout)")
    metrics = epoch_metrics(log)
    chosen = select_epochs(metrics)
    print(f"{run}: {len(metrics)} validated epochs\n")
    print("| selection rule | epoch | accuracy | F1+ | F1- | PxAP |\n|---|---|---|---|---|---|")
    for rule, epoch in chosen.items():
        m = metrics[epoch]
        cells = [_pct(m[k]) for k in ("val_accuracy", "val_f1_pos", "val_f1_neg", "val_pxap")]
        print(f"| {rule} | {epoch} | " + " | ".join(cells) + " |")

    items = [i for i in load_datalist(args.datalist, args.split) if "mask" in i]
    results: dict = {"selection": {r: {"epoch": e, **metrics[e]} for r, e in chosen.items()}, "rules": {}}
    checkpoints = {} if args.epochs else {"model.pt": run / "models" / "model.pt"}
    for epoch in args.epochs or chosen.values():
        snapshot = run / "models" / "snapshots" / f"model_epoch={epoch}.pt"
        if snapshot.is_file():
            checkpoints.setdefault(f"epoch {epoch}", snapshot)
    for name, checkpoint in checkpoints.items():
        if not checkpoint.is_file():
            print(f"\n{checkpoint} is missing: mask rules skipped for it")
            continue
        net = load_network(checkpoint, args.encoder, args.output_stride)
        rows = evaluate_rules(net, items, args.thresholds, [None, *args.short_sides], args.shifts)
        results["rules"][name] = print_rules(f"{name} ({checkpoint}), {len(items)} images", rows)
        if args.views:
            results.setdefault("views", {})[name] = print_views(classifier_views(net, items))
    if args.ceiling:
        title = f"a perfect map on the encoder's grid: the glands pooled to it, {len(items)} images"
        results["ceiling"] = print_rules(title, grid_ceiling(items, args.ceiling))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
