"""Training-step throughput: the max-min model against a plain image classifier with the same encoder.

Both take the same batch, size, device and AMP setting; one step = forward, loss, backward and SGD update. The
max-min step does about 1 + 2 x scale_in_cl^2 = 2.28 encoder passes (the localizer on x, the classifier on x * M
and x * (1 - M) in one batched pass), so its time ratio to the plain classifier should stay near that.

    python scripts/benchmark.py                           # CPU, EfficientNet-lite0, 4 x 3 x 224 x 224
    python scripts/benchmark.py --device cuda --amp --size 416 --steps 50
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from monai_wsl.losses import MaxMinUncertaintyLoss, WSLCrossEntropyLoss
from monai_wsl.networks import CAMClassifier, MaxMinUncertaintyNet


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_training_steps(net, loss_fn, x, y, steps: int, warmup: int, amp: bool) -> float:
    """Seconds per training step (median over ``steps`` after ``warmup`` steps)."""
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9, nesterov=True, weight_decay=1e-4)
    device = x.device
    dtype = torch.bfloat16 if device.type == "cpu" else torch.float16
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


def run(
    encoder: str = "efficientnet-lite0",
    size: int = 224,
    batch: int = 4,
    device: str = "cpu",
    amp: bool = False,
    steps: int = 10,
    warmup: int = 3,
    channels_last: bool = False,
) -> dict:
    torch.manual_seed(0)
    dev = torch.device(device)
    x = torch.randn(batch, 3, size, size, device=dev)
    y = torch.randint(0, 2, (batch,), device=dev)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    x = x.contiguous(memory_format=memory_format)
    maxmin = MaxMinUncertaintyNet(encoder=encoder).to(dev, memory_format=memory_format)
    plain = CAMClassifier(encoder=encoder, pooling="avg").to(dev, memory_format=memory_format)
    results = {}
    # Alternate the two models so that a slow phase of the machine hits both.
    for _ in range(2):
        t_plain = time_training_steps(plain, WSLCrossEntropyLoss(), x, y, steps, warmup, amp)
        t_maxmin = time_training_steps(maxmin, MaxMinUncertaintyLoss(), x, y, steps, warmup, amp)
        results.setdefault("plain", []).append(t_plain)
        results.setdefault("maxmin", []).append(t_maxmin)
    t_plain, t_maxmin = min(results["plain"]), min(results["maxmin"])
    return {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "encoder": encoder,
        "input": [batch, 3, size, size],
        "amp": amp,
        "plain_images_per_s": batch / t_plain,
        "maxmin_images_per_s": batch / t_maxmin,
        "time_ratio": t_maxmin / t_plain,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", default="efficientnet-lite0")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast on CPU, fp16 + GradScaler on CUDA")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument(
        "--cudnn-benchmark",
        action="store_true",
        help="let cuDNN autotune each convolution shape first (off by default, as in training: on an H200 the "
        "EfficientNet-lite0 run with it did not finish within a minute)",
    )
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    r = run(args.encoder, args.size, args.batch, args.device, args.amp, args.steps, args.warmup, args.channels_last)
    print(f"device {r['device']}, encoder {r['encoder']}, input {tuple(r['input'])}, amp {r['amp']}")
    print(f"plain classifier : {r['plain_images_per_s']:8.2f} images/s")
    print(f"max-min          : {r['maxmin_images_per_s']:8.2f} images/s")
    print(f"time ratio       : {r['time_ratio']:8.2f} (max-min / plain; about 2.28 encoder passes)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=1)


if __name__ == "__main__":
    main()
