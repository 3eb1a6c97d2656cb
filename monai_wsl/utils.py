"""Small helpers the bundle configs call."""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import logging
import os
import secrets
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = [
    "default_bundle_root",
    "list_images",
    "report_outputs",
    "atomic_write",
    "write_bytes_atomic",
    "write_json_atomic",
    "IMAGE_SUFFIXES",
    "keep_freed_memory",
    "data_workers",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".nii", ".nii.gz")


def default_bundle_root() -> str:
    """``"."`` when run from inside the bundle folder (``configs/metadata.json`` there), ``"bundle"`` when run from
    the repository root (``python -m monai.bundle run --config_file bundle/configs/train.json``), so that models and
    logs land in the bundle either way. Pass ``--bundle_root`` to choose."""
    if Path("configs/metadata.json").is_file():
        return "."
    if Path("bundle/configs/metadata.json").is_file():
        return "bundle"
    return "."


# glibc's mallopt() parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's largest on 64-bit systems (mallopt refuses more)


def keep_freed_memory(device: Any = "cpu", enabled: bool | str = "auto") -> bool:
    """Keep the memory that PyTorch frees on the CPU for the next step, instead of giving it back to the system.

    glibc's allocator returns a freed block to the system when it is above its mmap threshold (128 KiB at first,
    raised as blocks are freed, at most 32 MiB) and trims the heap's free top above twice that; a training or
    inference step on a CPU frees and allocates the same activations again and again, so each step pays the kernel to
    zero the same pages anew (millions of page faults an epoch). On 2 cores that was a third of
    a GlaS epoch (docs/results.md, table L). This sets glibc's thresholds so that blocks up to 32 MiB come from the
    heap and the heap keeps what it grew to: the process's memory stays near its peak, and the numbers computed do not
    change at all (allocation only). Applies to the whole process from this call on.

    ``enabled``: ``"auto"`` (on where ``device`` is a CPU), or a bool / "true" / "false". Returns whether it was set:
    False off Linux-glibc (macOS and Windows allocators differ; nothing is done) or when not enabled.
    """
    from monai.utils import str2bool

    if isinstance(enabled, str) and enabled.lower() == "auto":
        enabled = _is_cpu(device)
    try:
        enabled = str2bool(enabled)
    except ValueError:
        raise ValueError(
            f"keep_freed_memory must be auto, true or false, not {enabled!r}: pass --keep_freed_memory auto (on for "
            "CPUs), true or false."
        ) from None
    if not enabled or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries without mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done = [
        mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX),
        mallopt(_M_TRIM_THRESHOLD, 2**31 - 1),
        mallopt(_M_TOP_PAD, 256 * 2**20),
    ]
    return all(done)


def data_workers(device: Any = "cpu", elsewhere: int = 2) -> int:
    """The bundle's ``num_workers``: 0 where ``device`` is a CPU (the data is loaded in the training process), else
    ``elsewhere``. On a CPU the DataLoader's worker processes take the cores from the step's threads, which wait for
    each other: on 2 cores an epoch of the GlaS recipe took 63.7 s with 2 workers and 42.4 s without (docs/results.md,
    table L), while the augmentation itself costs under a second an epoch."""
    return 0 if _is_cpu(device) else int(elsewhere)


def _is_cpu(device: Any) -> bool:
    """Whether ``device`` (a ``torch.device`` or its name, such as ``"cpu"`` or ``"cuda:1"``) is a CPU."""
    return str(getattr(device, "type", device)).split(":")[0] == "cpu"


def list_images(folder: str | Path, exclude_masks: bool = True) -> list[dict[str, str]]:
    """``[{"image": path}, ...]`` for every image file in ``folder`` (sorted; GlaS ``*_anno`` masks left out), for
    inference. Raises ``ValueError`` when there is none, or when two share a name but for the extension (their outputs
    would overwrite each other)."""
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"{root} is not a folder: inference reads a folder of images (--dataset_dir FOLDER).")
    named_like_images = [p for p in sorted(root.iterdir()) if p.name.lower().endswith(IMAGE_SUFFIXES)]
    skipped = [p.name for p in named_like_images if not p.is_file()]
    if skipped:
        logging.getLogger("monai_wsl").warning(
            f"{root}: {', '.join(skipped)} named like an image but not a file (a folder?): skipped. Inference reads "
            "the image files directly in the folder given, not in its sub-folders; move them up to run them too."
        )
    found = [
        p for p in named_like_images if p.is_file() and not (exclude_masks and p.name.split(".")[0].endswith("_anno"))
    ]
    if not found:
        raise ValueError(f"no image ({', '.join(IMAGE_SUFFIXES)}) in {root}.")
    stems: dict[str, Path] = {}
    for p in found:
        stem = p.name.split(".")[0]
        if stem in stems:
            raise ValueError(
                f"{stems[stem]} and {p} would both be written as {stem}_mask: rename one of them or move it to "
                "another folder."
            )
        stems[stem] = p
    return [{"image": str(p)} for p in found]


def report_outputs(folder: str | Path, what: str) -> None:
    """Say where a run's files went: the folder, and what it holds by kind (``*_mask.png (18)``; hidden files and
    folders, a run's bookkeeping, left out)."""
    folder = Path(folder).resolve()
    kinds: dict[str, int] = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts):
            name = p.name if "_" not in p.stem else "*" + p.name[p.name.rfind("_") :]
            key = name if p.parent == folder else f"{p.parent.relative_to(folder)}/{name}"
            kinds[key] = kinds.get(key, 0) + 1
    listing = ", ".join(f"{k} ({n})" for k, n in kinds.items())
    logging.getLogger("monai_wsl").info(f"{what}: the results are in {folder}, which holds {listing}")


@contextmanager
def atomic_write(*paths: str | Path, suffix: str = "") -> Iterator[list[Path]]:
    """Temporary names beside ``paths`` (``.<name>.<random>.partial<suffix>``, in the same folder, which is created),
    for the block to write; when the block ends without an error each is renamed onto its path, in the order given
    (the last one last: it can mark the others complete), and when it raises none is. Leftover temporary files are
    removed either way, so a reader of ``paths`` sees a previous file or a complete new one, never half of one.
    ``suffix``: for writers that add their own extension (``np.savez`` and ``.npz``)."""
    targets = [Path(p) for p in paths]
    temporary = [p.with_name(f".{p.name}.{secrets.token_hex(4)}.partial{suffix}") for p in targets]
    for p in targets:
        p.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield temporary
        for tmp, path in zip(temporary, targets):
            os.replace(tmp, path)
    finally:
        for tmp in temporary:
            tmp.unlink(missing_ok=True)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to a temporary name beside ``path``, then rename it into place; an unchanged file is left as it
    is (a rerun rewrites nothing)."""
    path = Path(path)
    if path.is_file() and path.read_bytes() == data:
        return
    with atomic_write(path) as (tmp,):
        tmp.write_bytes(data)


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write JSON to a temporary file beside ``path``, then rename it: ``path`` is never half-written."""
    with atomic_write(path) as (tmp,):
        tmp.write_text(json.dumps(data, indent=1))
