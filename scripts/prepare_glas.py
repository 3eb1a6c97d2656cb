"""Write a MONAI datalist JSON for a GlaS release folder (see monai_wsl.data.glas).

Example::

    python scripts/prepare_glas.py --src ~/data/GlaS --out datalist.json
    python scripts/prepare_glas.py --src ../shared/data/glas --splits ../shared/data/glas/splits --out datalist.json
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

from script_args import add_split_arguments, prepare_parser

from monai_wsl.data.glas import DEFAULT_VALID_FRACTION, create_glas_datalist


def main(argv: list[str] | None = None) -> int:
    parser = prepare_parser(
        __doc__,
        "GlaS folder: train_N/testA_N/testB_N images, <name>_anno masks and Grade.csv",
        "datalist JSON to write",
    )
    parser.add_argument(
        "--splits",
        type=Path,
        default=None,
        help="folder with fold<F>_train.csv and fold<F>_valid.csv (default: <src>/splits if there, "
        "else a seeded stratified split)",
    )
    parser.add_argument("--fold", type=int, default=0, help="fold of the split files (default 0)")
    add_split_arguments(
        parser,
        "seed of the stratified split (default 0)",
        DEFAULT_VALID_FRACTION,
        f"validation share of each class in the stratified split (default {DEFAULT_VALID_FRACTION:.4f})",
    )
    parser.add_argument(
        "--allow-missing-train-masks",
        action="store_true",
        help="let training images lack a *_anno mask (validation and test images still need one)",
    )
    args = parser.parse_args(argv)

    try:
        datalist = create_glas_datalist(
            args.src,
            splits_dir=args.splits,
            fold=args.fold,
            seed=args.seed,
            valid_fraction=args.valid_fraction,
            require_train_masks=not args.allow_missing_train_masks,
        )
    except ValueError as e:
        parser.exit(1, f"error: {e}\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(datalist, indent=1))

    names = datalist["labels"]
    print(f"wrote {args.out}")
    for split in ("training", "validation", "test"):
        if split in datalist:
            counts = Counter(item["label"] for item in datalist[split])
            per_class = ", ".join(f"{name} {counts.get(i, 0)}" for i, name in enumerate(names))
            print(f"{split}: {len(datalist[split])} ({per_class})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
