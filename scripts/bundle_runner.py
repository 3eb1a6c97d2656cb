"""Run MONAI bundle commands as a user would (``python -m monai.bundle run --config_file [...]``), several side by
side: each in its own process, logged to its own file, with an equal share of the CPU cores.

Used by ``scripts/report.py --run``; any list of config-file runs can use it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"


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


def _arg(value) -> str:
    return repr(value) if isinstance(value, bool) else str(value)


def run_bundle(configs: Sequence[str], overrides: dict, log: Path, env: dict | None = None) -> float:
    """``python -m monai.bundle run`` with the config files ``configs`` (names under ``bundle/configs``, merged in
    order) and ``--key value`` overrides, in a subprocess logging to ``log``; returns the wall time in seconds.

    Raises:
        RuntimeError: the run failed; the message names its log.
    """
    files = [str(CONFIGS / c) for c in configs]
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "[" + ",".join(f"'{f}'" for f in files) + "]"]
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


def run_side_by_side(chains: Sequence[Sequence], jobs: int, step: Callable[[object], None]) -> list[Exception]:
    """Run ``step`` on every element of ``chains``, ``jobs`` chains at a time, in the order given; within a chain one
    after the other, and a chain stops at its first failure (later steps need what it makes). Returns the failures,
    each already printed with the step it stopped."""
    failures: list[Exception] = []

    def chain(steps: Sequence) -> None:
        for k, item in enumerate(steps):
            try:
                step(item)
            except (RuntimeError, FileNotFoundError) as error:  # the other chains go on; reported at the end
                print(f"[failed] {item}: {error}", flush=True)
                failures.append(error)
                for skipped in steps[k + 1 :]:
                    print(f"[skipped] {skipped}: {item} failed", flush=True)
                return

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for future in [pool.submit(chain, steps) for steps in chains]:
            future.result()
    return failures
