"""Many slides over many processes: disjoint shares balanced by tissue area, torchrun's ranks and ``--shard i/n``
giving the outputs of one process, a rerun that skips complete slides and finishes a killed one, and one table of
all slides with their status."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("openslide")
tifffile = pytest.importorskip("tifffile")

from monai_wsl.data import slide_outputs_complete  # noqa: E402
from monai_wsl.inferers import SlideInferer, SlideShards, balanced_shares, parse_shard  # noqa: E402
from monai_wsl.inferers.shard import tissue_area_estimate  # noqa: E402
from monai_wsl.networks import MaxMinUncertaintyNet  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
B = 128  # the patch size, and the side of the blocks of the slides' 2 x 4 grid
TISSUE_BLOCKS = (2, 7, 1, 5, 3)  # blocks of tissue on each slide


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return MaxMinUncertaintyNet(encoder="efficientnet-lite0", pretrained=True).eval()


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> list[Path]:
    """Five 512 x 256 slides (two levels), with 2, 7, 1, 5 and 3 of their eight 128-pixel blocks stained."""
    folder = tmp_path_factory.mktemp("slides")
    out = []
    for n, blocks in enumerate(TISSUE_BLOCKS):
        rng = np.random.default_rng(n)
        rgb = np.full((2 * B, 4 * B, 3), 242, np.uint8)
        for b in range(blocks):
            y, x = B * (b // 4), B * (b % 4)
            shade = rng.uniform(0.75, 1.05, (B, B, 1))
            rgb[y : y + B, x : x + B] = np.clip(np.array([200, 120, 180]) * shade, 0, 255).astype(np.uint8)
        path = folder / f"slide{n}.tif"
        with tifffile.TiffWriter(path) as tif:
            for factor in (1, 2):
                res = 1e4 / (0.5 * factor)
                tif.write(
                    rgb[::factor, ::factor],
                    tile=(128, 128),
                    photometric="rgb",
                    compression="zlib",
                    subfiletype=int(factor > 1),
                    resolution=(res, res),
                    resolutionunit="CENTIMETER",
                    metadata=None,
                )
        out.append(path)
    return out


def inferer(net, out, **kwargs):
    return SlideInferer(net, out, patch_size=B, overlap=0.0, progress=False, **kwargs)


def outputs(folder: Path) -> dict[str, bytes | dict]:
    """The slides' files in a folder (each JSON without its seconds), the bookkeeping left out."""
    files: dict[str, bytes | dict] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and not p.name.startswith(("slides_summary", ".")):
            files[p.name] = p.read_bytes()
            if p.suffix == ".json":
                files[p.name] = {k: v for k, v in json.loads(p.read_text()).items() if k != "seconds"}
    return files


def table(folder: Path) -> dict[str, dict]:
    with open(folder / "slides_summary.csv", newline="") as f:
        return {Path(row["slide"]).stem: row for row in csv.DictReader(f)}


def test_shares_are_disjoint_cover_every_slide_and_are_balanced():
    weights = [10.0, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 0]
    for n in (1, 2, 3, 5):
        shares = balanced_shares(weights, n)
        flat = sorted(i for s in shares for i in s)
        assert flat == list(range(len(weights))) and len(shares) == n  # each slide in exactly one share
        loads = [sum(weights[i] for i in s) for s in shares]
        best = max(sum(weights) / n, max(weights))
        assert max(loads) <= 4 / 3 * best  # the bound of longest-first
        assert max(loads) - min(loads) <= max(weights)
        assert balanced_shares(weights, n) == shares  # the same every time: processes agree without talking
    assert balanced_shares([10.0, 9, 8, 7, 6, 5, 4, 3, 2, 1], 2) == [[0, 3, 4, 7, 8], [1, 2, 5, 6, 9]]  # 28 | 27
    # balancing by weight, not by count: one heavy slide against four light ones
    assert balanced_shares([1.0, 1, 100, 1, 1], 2) == [[2], [0, 1, 3, 4]]


def test_shard_option_is_checked():
    assert parse_shard("1/4") == (1, 4) and parse_shard(None) is None and parse_shard("null") is None
    assert parse_shard([0, 2]) == (0, 2)
    with pytest.raises(ValueError, match=r"'2/2'.*from 0 to n - 1"):
        parse_shard("2/2")
    with pytest.raises(ValueError, match=r"'half' is not 'i/n'.*--shard 0/2"):
        parse_shard("half")


def test_shard_is_refused_under_torchrun(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(ValueError, match="under torchrun"):
        SlideShards("0/2")
    shards = SlideShards(None)
    assert (shards.rank, shards.world_size, shards.distributed) == (1, 2, True)


def test_tissue_estimate_follows_the_stained_area(slides):
    areas = [tissue_area_estimate(s) for s in slides]
    assert np.allclose(np.array(areas) / B**2, TISSUE_BLOCKS, atol=0.05)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, net, slides) -> tuple[Path, list[dict]]:
    """The five slides in one process, on one thread (as the shards and ranks the tests compare it with)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    one = tmp_path_factory.mktemp("one")
    try:
        return one, inferer(net, one).run(slides)
    finally:
        torch.set_num_threads(threads)


def test_two_shards_give_the_outputs_of_one_process_and_one_table(tmp_path, net, slides, one_process):
    one, summaries = one_process
    torch.set_num_threads(1)  # the same arithmetic as one_process (the tests after this get their threads back)
    assert [s["patches_run"] for s in summaries] == list(TISSUE_BLOCKS)
    rows = table(one)
    assert [rows[s.stem]["status"] for s in slides] == ["done"] * 5 and rows["slide1"]["patches_run"] == "7"
    assert float(rows["slide1"]["tissue_area_mm2"]) == pytest.approx(7 * (B * 0.5e-3) ** 2, rel=0.05)

    two = tmp_path / "two"
    first = inferer(net, two).run(slides, shard="0/2")
    # by tissue (7, 5, 3, 2, 1 blocks), the largest first to the lighter share: shard 0 takes slide1 and slide0
    # (9 blocks), shard 1 slide3, slide4 and slide2 (9 blocks)
    assert sorted(s["slide"] for s in first) == [str(slides[i].absolute()) for i in (0, 1)]
    rows = table(two)
    assert [rows[s.stem]["status"] for s in slides] == ["done", "done", "pending", "pending", "pending"]
    second = inferer(net, two).run(slides, shard="1/2")
    assert sorted(s["slide"] for s in second) == [str(slides[i].absolute()) for i in (2, 3, 4)]
    assert outputs(two) == outputs(one)  # byte for byte (JSON: but the seconds)
    rows = table(two)
    assert [rows[s.stem]["status"] for s in slides] == ["done"] * 5
    assert [rows[s.stem]["shard"] for s in slides] == ["0/2", "0/2", "1/2", "1/2", "1/2"]
    assert json.loads((two / "slides_summary.json").read_text())["counts"] == {"done": 5}


def test_a_killed_run_resumes_without_redoing_finished_slides(tmp_path, net, slides, monkeypatch):
    out = tmp_path / "out"
    run = inferer(net, out)
    forward, seen = run.infer_patches, []

    def killed_on_the_fourth_slide(patches):
        seen.append(len(patches))
        if sum(seen) > sum(TISSUE_BLOCKS[:3]):  # the fourth slide's first batch: the process is stopped
            raise KeyboardInterrupt
        return forward(patches)

    monkeypatch.setattr(run, "infer_patches", killed_on_the_fourth_slide)
    (out).mkdir()
    (out / ".slide3_map.tif.0123abcd.partial").write_bytes(b"half")  # what a SIGKILL leaves behind
    with pytest.raises(KeyboardInterrupt):
        run.run(slides)
    assert [slide_outputs_complete(out, s.stem) is None for s in slides] == [True, True, True, False, False]
    assert not (out / "slides_summary.csv").exists()
    finished = {s.stem: (out / f"{s.stem}_map.tif").stat().st_mtime_ns for s in slides[:3]}

    seen.clear()
    monkeypatch.setattr(run, "infer_patches", lambda p: seen.append(len(p)) or forward(p))
    summaries = run.run(slides)
    assert sum(seen) == sum(TISSUE_BLOCKS[3:])  # only the two slides left ran
    assert [s["patches_run"] for s in summaries] == list(TISSUE_BLOCKS)
    assert {s.stem: (out / f"{s.stem}_map.tif").stat().st_mtime_ns for s in slides[:3]} == finished
    assert not list(out.glob(".*partial")) and not list(out.glob(".slide*.work.*"))
    rows = table(out)
    assert [rows[s.stem]["status"] for s in slides] == ["skipped-complete"] * 3 + ["done"] * 2
    assert rows["slide0"]["regions"] != "" and float(rows["slide0"]["seconds"]) > 0


def test_a_failed_slide_is_in_the_table_with_its_error_and_runs_again(tmp_path, net, slides, monkeypatch):
    out = tmp_path / "out"
    run = inferer(net, out)
    forward, calls = run.infer_patches, []

    def failing(patches):
        calls.append(len(patches))
        if len(calls) == 1:
            raise OSError("damaged tile")
        return forward(patches)

    monkeypatch.setattr(run, "infer_patches", failing)
    with pytest.raises(RuntimeError, match=r"(?s)1 of 2 slide\(s\) failed.*slide0.tif: OSError: damaged tile"):
        run.run(slides[:2])
    rows = table(out)
    assert rows["slide0"]["status"] == "failed" and rows["slide0"]["error"] == "OSError: damaged tile"
    assert rows["slide1"]["status"] == "done" and rows["slide0"]["patches_run"] == ""
    assert float(rows["slide0"]["tissue_area_px"]) == pytest.approx(2 * B**2, rel=0.05)  # the estimate
    assert run.run(slides[:2])[0]["patches_run"] == 2
    rows = table(out)
    assert (rows["slide0"]["status"], rows["slide0"]["error"], rows["slide1"]["status"]) == (
        "done",
        "",
        "skipped-complete",
    )


def test_outputs_that_are_not_complete_are_redone(tmp_path, net, slides, monkeypatch):
    """New files beside an old JSON cannot happen: the old JSON goes before the first rename. A file changed or
    missing, or other settings, and the slide runs again."""
    out = tmp_path / "out"
    slide = slides[2]
    inferer(net, out).run([slide])
    assert slide_outputs_complete(out, "slide2") is None

    import monai_wsl.utils

    replace = os.replace

    def killed_before_the_json(src, dst):  # the process stops between the renames of a rerun
        if str(dst).endswith("slide2.json"):
            raise KeyboardInterrupt
        return replace(src, dst)

    monkeypatch.setattr(monai_wsl.utils.os, "replace", killed_before_the_json)
    with pytest.raises(KeyboardInterrupt):
        inferer(net, out, threshold=0.4).run([slide])  # other settings: run again, stopped before its JSON lands
    monkeypatch.setattr(monai_wsl.utils.os, "replace", replace)
    assert (out / "slide2_map.tif").exists() and not (out / "slide2.json").exists()
    assert slide_outputs_complete(out, "slide2") == "slide2.json is not there"

    inferer(net, out).run([slide])
    assert slide_outputs_complete(out, "slide2", inferer(net, out).settings()) is None
    assert table(out)["slide2"]["status"] == "done"
    assert "other settings (threshold)" in slide_outputs_complete(
        out, "slide2", inferer(net, out, threshold=0.4).settings()
    )
    geojson = out / "slide2.geojson"
    geojson.write_text(geojson.read_text() + " ")
    assert "slide2.geojson has" in slide_outputs_complete(out, "slide2")
    inferer(net, out).run([slide])
    assert table(out)["slide2"]["status"] == "done" and slide_outputs_complete(out, "slide2") is None


SCRIPT = """
import logging, sys, torch
from monai_wsl.inferers import SlideInferer
from monai_wsl.networks import MaxMinUncertaintyNet
logging.basicConfig(level=logging.INFO)
torch.set_num_threads(1)
net = MaxMinUncertaintyNet(encoder="efficientnet-lite0").eval()
net.load_state_dict(torch.load(sys.argv[1]))
SlideInferer(net, sys.argv[2], patch_size=128, overlap=0.0, progress=False).run(sys.argv[3].split(","))
"""


@pytest.mark.slow  # three Python processes start (torchrun's agent and two ranks): 22 s on 2 busy CPU cores
def test_torchrun_ranks_share_the_slides_and_rank_0_writes_the_table(tmp_path, net, slides, one_process):
    """``torchrun --nproc_per_node 2`` over five slides: every slide done once, by the rank the shares say, the
    outputs of one process, one table."""
    one, _ = one_process
    torch.save(net.state_dict(), tmp_path / "model.pt")
    (tmp_path / "run.py").write_text(SCRIPT)
    out = tmp_path / "two"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    args = [str(tmp_path / "run.py"), str(tmp_path / "model.pt"), str(out), ",".join(map(str, slides))]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(command + args, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert outputs(out) == outputs(one)
    rows = table(out)
    assert [rows[s.stem]["status"] for s in slides] == ["done"] * 5
    assert [rows[s.stem]["shard"] for s in slides] == ["0/2", "0/2", "1/2", "1/2", "1/2"]
    summary = json.loads((out / "slides_summary.json").read_text())
    assert summary["counts"] == {"done": 5} and summary["processes"] == 2 and summary["torchrun"] is True
    assert "[shard 0/2] 2 of 5 slide(s)" in result.stderr and "[shard 1/2] 3 of 5 slide(s)" in result.stderr
