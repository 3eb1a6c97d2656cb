"""Where a trained localizer's maps are high or low by position alone: the mean, over images, of the standardised
class map (the softmax-weighted mix the soft mask is made from, before upsampling) per row and per column of the
encoder's grid, for crops taken at the images' corner and again for the same crops shifted by ``--shift`` pixels.
Content moves with the shift; a pattern tied to the borders stays where it is. Then PxAP, F1+ and F1- of the whole
images' masks (pixels pooled over the images) within ``--band`` pixels of the edge and beyond.

    python scripts/map_profile.py --checkpoint runs/glas/models/model.pt --datalist runs/glas/datalist.json

The images are read as the bundle reads them (MONAI's ``LoadImage``), so rows and columns are the bundle's. The
network is the one the model card beside the checkpoint records (``network_def``, its padding mode included);
``--encoder`` and ``--padding_mode`` give them for a model whose card does not record it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from script_args import study_parser


def standardised_map(net, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        scores, maps, _ = net.localize(x)
        mixed = (scores.softmax(1)[..., None, None] * maps).sum(1)[0].numpy()
    return (mixed - mixed.mean()) / mixed.std()


def main() -> None:
    parser = study_parser(__doc__, "--checkpoint", "a max-min model.pt (or a training checkpoint)")
    parser.add_argument(
        "--padding_mode", help="default: the model card's, else zeros (one the card contradicts is refused)"
    )
    parser.add_argument(
        "--crop",
        type=int,
        nargs=2,
        default=[704, 448],
        help="height and width of the crop at each image's corner, as the bundle reads the image (GlaS: 775 x 522)",
    )
    parser.add_argument("--shift", type=int, default=64, help="pixels the second crop is moved by, down and right")
    parser.add_argument("--band", type=int, default=64, help="width in pixels of the border band scored apart")
    parser.add_argument("--json", help="also write the profiles to this file")
    args = parser.parse_args()

    from monai.transforms import EnsureChannelFirst, LoadImage

    from monai_wsl.data import load_datalist
    from monai_wsl.metrics import compute_pxap
    from monai_wsl.model_card import load_trained_network

    given = {k: v for k, v in (("encoder", args.encoder), ("padding_mode", args.padding_mode)) if v}
    net = load_trained_network(args.checkpoint, without_card={"encoder": "efficientnet-lite0"}, **given)
    mode = net.padding_mode
    load = LoadImage(image_only=True)
    h, w, s = *args.crop, args.shift
    at_corner, shifted = [], []
    scores = {"band": ([], []), "interior": ([], [])}  # the whole images' soft masks and ground truth, by region
    for item in load_datalist(args.datalist, args.split):
        image = EnsureChannelFirst()(load(item["image"]))[:3].float() / 127.5 - 1
        if "mask" in item:
            with torch.no_grad():
                mask = net.localize(image.as_tensor()[None])[2][0, 0]
            truth = EnsureChannelFirst()(load(item["mask"]))[0].as_tensor() > 0
            band = torch.ones_like(truth)
            band[args.band : -args.band, args.band : -args.band] = False
            for region, where in (("band", band), ("interior", ~band)):
                scores[region][0].append(mask[where])
                scores[region][1].append(truth[where])
        if image.shape[1] < h + s or image.shape[2] < w + s:
            continue
        x = image.as_tensor()[None]
        at_corner.append(standardised_map(net, x[..., :h, :w]))
        shifted.append(standardised_map(net, x[..., s : s + h, s : s + w]))
    if not at_corner:
        too_small = f"no image of {args.datalist} [{args.split}] is {h + s} x {w + s} pixels or more"
        raise SystemExit(f"{too_small}: lower --crop or --shift")
    a, b = np.mean(at_corner, 0), np.mean(shifted, 0)
    np.set_printoptions(precision=2, suppress=True, linewidth=200)
    print(f"{len(at_corner)} images, padding {mode}, crops {h} x {w} -> maps {a.shape[0]} x {a.shape[1]}; mean z-score")
    for name, axis in (("rows", 1), ("columns", 0)):
        print(f"{name} at the corner: {a.mean(axis)}")
        print(f"{name} shifted     : {b.mean(axis)}  (content {s // 32} cells towards the start)")
    first, second, last = (float(np.mean([a.mean(1)[i], a.mean(0)[i]])) for i in (0, 1, -1))
    print(f"border (rows and columns together): first {first:+.2f}, second {second:+.2f}, last {last:+.2f}")
    regions = {}
    for region, (masks, truths) in scores.items():
        if not masks:
            continue
        m, t = torch.cat(masks), torch.cat(truths)
        seg = m >= 0.5
        regions[region] = {
            "pixels": int(m.numel()),
            "pxap": float(compute_pxap(m[None, None, None], t[None, None, None].float())),
            "f1_pos": float(2 * (seg & t).sum() / (seg.sum() + t.sum()).clamp_min(1)),
            "f1_neg": float(2 * (~seg & ~t).sum() / ((~seg).sum() + (~t).sum()).clamp_min(1)),
        }
        r = regions[region]
        print(
            f"{region:8s} ({'within' if region == 'band' else 'beyond'} {args.band} px of the edge, {r['pixels']} "
            f"pixels, pooled): PxAP {100 * r['pxap']:.1f}, F1+ {100 * r['f1_pos']:.1f}, F1- {100 * r['f1_neg']:.1f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({
            "padding_mode": mode, "images": len(at_corner), "rows": a.mean(1).tolist(), "columns": a.mean(0).tolist(),
            "rows_shifted": b.mean(1).tolist(), "columns_shifted": b.mean(0).tolist(),
            "first": first, "second": second, "last": last, "regions": regions,
        }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
