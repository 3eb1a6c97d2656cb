#!/usr/bin/env bash
# Install just enough of MONAI Label to import `monailabel.tasks.infer.bundle.BundleInferTask`, into a separate folder,
# without touching the current environment's torch / numpy.
#
# Usage: scripts/install_monailabel.sh TARGET_DIR        (the tests look in <repo>/.monailabel by default,
#                                                          or in $MONAI_WSL_MONAILABEL_DIR)
#        PYTHON=/path/to/python scripts/install_monailabel.sh TARGET_DIR
#
# Why not `pip install monailabel`: its dependency set (monai[...,torchvision], sam2, numpymaxflow, pydicom-seg, ...)
# replaces torch 2.13 CPU with torch 2.14 + CUDA wheels and downgrades numpy to 1.26. So every package here is
# installed with --no-deps into TARGET_DIR, which is then put at the END of sys.path (tests/monailabel_env.py), so the
# project's own torch / numpy / monai / itk / scikit-image / scipy always win.
#
# What the import chain of monailabel.tasks.infer.bundle really needs beyond the project venv (checked one
# ModuleNotFoundError at a time): expiring_dict (+ sortedcontainers), pydantic (+ pydantic-core, annotated-types,
# typing-inspection), pydantic-settings (+ python-dotenv), pynrrd, shapely, and `torchvision.utils.make_grid /
# save_image`, for which a small stub is written (the real torchvision cannot be installed beside this torch).
# scikit-image / scipy / lazy-loader come from the project's [test] extra; pinned copies are added here only when the
# running Python cannot import them.
#
# Idempotent: a marker file records what was installed; a second run with the same pins and a working import is a
# no-op. Needs network access to PyPI on the first run only.
set -euo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 TARGET_DIR" >&2
    exit 2
fi

PY="${PYTHON:-python}"
TARGET="$1"
MARKER_NAME=".monai_wsl_monailabel_install"

# Pins: wheels exist for CPython 3.10-3.13 and all work with numpy 2.x (shapely>=2.1 is built against numpy 2).
# pydantic 2.14.4 needs exactly pydantic-core 2.50.5 and typing-extensions>=4.16.
PACKAGES=(
    "monailabel==0.8.5"
    "expiring_dict==1.1.2"
    "sortedcontainers==2.4.0"
    "pydantic==2.14.4"
    "pydantic-core==2.50.5"
    "annotated-types==0.8.0"
    "typing-inspection==0.4.5"
    "pydantic-settings==2.15.0"
    "python-dotenv==1.2.4"
    "pynrrd==1.1.3"
    "shapely==2.1.2"
)
# Only if the running Python lacks them (the project's [test] extra normally provides them).
FALLBACK_PACKAGES=(
    "scikit-image==0.25.2"
    "scipy==1.15.3"
    "lazy-loader==0.4"
)

start=$(date +%s)

# The import check run after installing and before skipping: TARGET_DIR is appended to sys.path, as the tests do.
check_import() {
    "$PY" - "$1" <<'EOF'
import sys

sys.path.append(sys.argv[1])
import numpy
import torch
from monailabel.tasks.infer.bundle import BundleInferTask  # noqa: F401
import monailabel

print(f"monailabel {monailabel.__version__} importable (torch {torch.__version__}, numpy {numpy.__version__})")
EOF
}

if ! "$PY" -c "import skimage.measure, scipy.ndimage, lazy_loader" >/dev/null 2>&1; then
    echo "scikit-image/scipy/lazy-loader not importable from $PY: adding pinned copies to $TARGET"
    PACKAGES+=("${FALLBACK_PACKAGES[@]}")
fi

SPEC="python=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])') ${PACKAGES[*]} torchvision-stub=1"

if [[ -f "$TARGET/$MARKER_NAME" ]] && [[ "$(cat "$TARGET/$MARKER_NAME")" == "$SPEC" ]]; then
    if check_import "$TARGET"; then
        echo "monailabel already installed in $TARGET (marker matches); nothing to do ($(($(date +%s) - start)) s)"
        exit 0
    fi
    echo "marker present in $TARGET but the import fails: reinstalling"
fi

if [[ -e "$TARGET" ]]; then
    if [[ -f "$TARGET/$MARKER_NAME" ]] || [[ -z "$(ls -A "$TARGET")" ]]; then
        rm -rf "$TARGET"
    else
        echo "error: $TARGET exists and was not made by this script (no $MARKER_NAME): remove it or pick another" >&2
        exit 1
    fi
fi

STAGE="$TARGET.partial.$$"
trap 'rm -rf "$STAGE"' EXIT
mkdir -p "$STAGE"

echo "installing into $TARGET with $("$PY" -c 'import sys; print(sys.executable)') (--no-deps):"
printf '  %s\n' "${PACKAGES[@]}"
# --no-deps: never let pip resolve monailabel's real dependency set; --only-binary: no builds (2-core CI).
"$PY" -m pip install --no-deps --only-binary=:all: --no-compile --disable-pip-version-check --quiet \
    --target "$STAGE" "${PACKAGES[@]}"

# pip warns "Target directory .../monailabel already exists": the wheel's data files (sample-apps/, plugins/, 9 MB)
# also target `monailabel/` and are skipped; BundleInferTask does not need them.
# monailabel's wheel ships its own top-level `tests` package and a `bin/` folder, pynrrd a top-level `docs/`: drop them
# so that nothing named `tests` or `docs` from them can mix with this project's own.
rm -rf "$STAGE/tests" "$STAGE/bin" "$STAGE/docs"

mkdir -p "$STAGE/torchvision"
cat >"$STAGE/torchvision/__init__.py" <<'EOF'
"""STUB, NOT torchvision. Written by monai_wsl's scripts/install_monailabel.sh.

`monailabel.transform.post` (imported by `monailabel.tasks.infer.bundle`) does
`from torchvision.utils import make_grid, save_image` at module level, but only uses them in debug "dump" transforms.
The real torchvision wheel pins one exact torch version, so installing it beside the project's torch would replace
torch. This package only provides `torchvision.utils.make_grid` / `save_image` (plain torch + PIL), and a version of
0.0.0 so that version-checking `optional_import`s (MONAI's) treat torchvision as absent. Nothing else exists here:
`torchvision.models`, `torchvision.transforms`, ... raise ImportError as if torchvision were not installed.
"""

__version__ = "0.0.0+monai_wsl.stub"
__all__ = ["utils"]
EOF
cat >"$STAGE/torchvision/utils.py" <<'EOF'
"""STUB of `torchvision.utils` (see `torchvision/__init__.py`): `make_grid` and `save_image` only, enough for the
module-level import in `monailabel.transform.post`. Written by monai_wsl's scripts/install_monailabel.sh."""

import math

import torch


def make_grid(tensor, nrow=8, padding=2, normalize=False, value_range=None, scale_each=False, pad_value=0.0, **kwargs):
    """Tile a (B, C, H, W) tensor (or a list of (C, H, W)) into one (3 or C, H', W') image, like torchvision's."""
    if isinstance(tensor, (list, tuple)):
        tensor = torch.stack(list(tensor), dim=0)
    tensor = torch.as_tensor(tensor)
    if tensor.dim() == 2:
        tensor = tensor.unsqueeze(0)
    if tensor.dim() == 3:
        if tensor.size(0) == 1:
            tensor = torch.cat((tensor, tensor, tensor), 0)
        tensor = tensor.unsqueeze(0)
    if tensor.dim() == 4 and tensor.size(1) == 1:
        tensor = torch.cat((tensor, tensor, tensor), 1)
    if normalize:
        tensor = tensor.clone().float()

        def _norm(t, lo, hi):
            t.clamp_(min=lo, max=hi)
            t.sub_(lo).div_(max(hi - lo, 1e-5))

        for t in tensor if scale_each else [tensor]:
            lo, hi = value_range if value_range is not None else (float(t.min()), float(t.max()))
            _norm(t, lo, hi)
    if tensor.size(0) == 1:
        return tensor.squeeze(0)
    nmaps = tensor.size(0)
    xmaps = min(nrow, nmaps)
    ymaps = int(math.ceil(float(nmaps) / xmaps))
    height, width = int(tensor.size(2) + padding), int(tensor.size(3) + padding)
    grid = tensor.new_full((tensor.size(1), height * ymaps + padding, width * xmaps + padding), pad_value)
    k = 0
    for y in range(ymaps):
        for x in range(xmaps):
            if k >= nmaps:
                break
            grid[:, y * height + padding : (y + 1) * height, x * width + padding : (x + 1) * width] = tensor[k]
            k += 1
    return grid


def save_image(tensor, fp, format=None, **kwargs):
    """Save `make_grid(tensor, **kwargs)` (values in [0, 1]) as an 8-bit image with PIL."""
    from PIL import Image

    grid = make_grid(tensor, **kwargs)
    ndarr = grid.mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 0).to("cpu", torch.uint8).numpy()
    Image.fromarray(ndarr).save(fp, format=format)
EOF

check_import "$STAGE"
echo "$SPEC" >"$STAGE/$MARKER_NAME"
mv "$STAGE" "$TARGET"
trap - EXIT

echo "installed monailabel into $TARGET: $(du -sh "$TARGET" | cut -f1), $(($(date +%s) - start)) s"
