"""Every command of README.md and bundle/docs/README.md, run as written in a copy of the repository with ``../shared``
beside it (a fresh clone's layout), in the order the docs give them. Trainings get one epoch (and the GlaS recipe small
crops); every other argument is the docs'. The placeholders (``FOLDER_OF_IMAGES`` ...) become folders of real GlaS
images, a synthetic slide and the synthetic volumes. A command that cannot run here is listed in ``NOT_RUN`` with the
reason and the test that covers its code instead: a new command in the docs that is neither run nor listed fails."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "bundle/docs/README.md")

#: (pattern, why it is not run here); the first match decides
NOT_RUN = [
    (r"^python3 -m venv|^\. .*/activate$|^pip install", "an install: .ci/run runs the README's on a fresh clone"),
    (r"^pytest$", "the test suite itself"),
    (r"^tensorboard ", "a server that runs until it is stopped"),
    (
        r"monailabel|^curl |~/monai_wsl|~/apps|^pip check$",
        "MONAI Label, in its own environment: scripts/monailabel_check.py runs its section as written (in CI)",
    ),
    (r"camelyon16", "the CAMELYON16 release (700 GB) is not here: tests/test_camelyon16.py runs its code on slides"),
    (r"torchrun .*inference_wsi", "several inference processes: tests/test_slide_shard.py runs torchrun over slides"),
    (r"^torchrun ", "several training processes: tests/test_bundle.py runs multi_gpu_train.json under torchrun"),
    (r"--shard|nproc_per_node", "several inference processes: tests/test_slide_shard.py runs --shard and torchrun"),
    (r"--eval_split test", "the official GlaS test images are not in ../shared"),
]

#: the docs' placeholders -> what stands for them here (paths relative to the copy)
PLACEHOLDERS = {
    "FOLDER_OF_IMAGES": "../shared/data/glas-bmp-sample",
    "FOLDER_OF_SLIDES": "runs/docs_slides",
    "FOLDER_OF_VOLUMES": "bundle/data/synthetic_3d",
}

#: a training's arguments replaced (or added) so that it takes seconds
SHORT_TRAINING = {"--max_epochs": "1"}
SHORT_GLAS = {"--crop_size": "96", "--resize_short_side": "112"}


def doc_commands(path: Path) -> list[str]:
    """The shell commands of a Markdown file's ``bash`` blocks: continued lines joined, the steps of an ``&&`` chain
    apart, comments left out."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", path.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s{2,}# .*$", "", line).strip()  # a trailing comment (a config key's # has no space)
            if line and not line.startswith("#"):
                commands += [" ".join(part.split()) for part in line.split(" && ")]  # each step of a chain
    return commands


def not_run_reason(command: str) -> str | None:
    return next((why for pattern, why in NOT_RUN if re.search(pattern, command)), None)


def shortened(args: list[str]) -> list[str]:
    """A training command with one epoch (and small GlaS crops); others as they are."""
    if "monai.bundle" not in args or "run" not in args:
        return args
    configs = args[args.index("--config_file") + 1] if "--config_file" in args else ""
    if "train.json" not in configs or "evaluate.json" in configs:
        return args
    replace = {**SHORT_TRAINING, **(SHORT_GLAS if "recipes/glas.json" in configs else {})}
    args = list(args)
    for flag, value in replace.items():
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    return args


def test_every_documented_command_is_run_or_said_why_not():
    """The classification itself, cheap: every command is either run by the slow test below or listed with a reason,
    and each placeholder the docs use is known."""
    commands = [c for doc in DOCS for c in doc_commands(REPO / doc)]
    assert len(commands) >= 25, commands  # the parser finds the docs' blocks
    run = [c for c in commands if not_run_reason(c) is None]
    assert any("recipes/glas.json" in c for c in run) and any("inference_wsi.json" in c for c in run)
    for command in run:
        assert shlex.split(command)[0] in ("python", "python3"), f"{command}: not a program the slow test can start"
        unknown = set(re.findall(r"\b[A-Z][A-Z_]{5,}\b", command)) - set(PLACEHOLDERS) - {"OMP_NUM_THREADS"}
        assert not unknown, f"{command}: a placeholder without a stand-in here: {unknown}"
    for pattern, _ in NOT_RUN:  # no stale entry: each still matches a documented command
        assert any(re.search(pattern, c) for c in commands), pattern


@pytest.mark.slow
def test_the_documented_commands_run_as_written(tmp_path, shared_data):
    clone = tmp_path / "monai_wsl"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True)
    for name in files.stdout.splitlines():
        if (REPO / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, clone / name)
    (tmp_path / "shared").symlink_to(shared_data.parent)

    from monai_wsl.data import write_synthetic_slide

    write_synthetic_slide(clone / PLACEHOLDERS["FOLDER_OF_SLIDES"] / "slide.tif", rows=3, cols=4, tile=256)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "PYTHONUNBUFFERED": "1"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # python = this environment's
    ran = []
    for doc in DOCS:
        for command in doc_commands(REPO / doc):
            if not_run_reason(command) is not None:
                continue
            for placeholder, stand_in in PLACEHOLDERS.items():
                command = command.replace(placeholder, stand_in)
            args = shortened(shlex.split(command))
            result = subprocess.run(args, cwd=clone, env=env, capture_output=True, text=True, timeout=900)
            assert result.returncode == 0, f"{doc}: {command}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
            ran.append(command)
    assert len(ran) >= 15, ran
    # what the docs say the commands leave behind
    assert (clone / "bundle" / "models" / "model.pt").is_file() and (clone / "bundle" / "models" / "model.ts").is_file()
    assert (clone / "runs" / "glas" / "datalist.json").is_file()
    assert any((clone / "bundle" / "inference").rglob("*_mask.png"))
    assert (clone / "runs" / "docs_slides").is_dir() and any((clone / "bundle" / "inference" / "slides").glob("*.tif"))
