"""scripts/benchmark.py: the end-to-end split of an epoch (Ignite's HandlersTimeProfiler on the trainer and on the
validation evaluator) and the recipe run it reports on."""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import pytest
from ignite.engine import Engine, Events

REPO = Path(__file__).resolve().parents[1]


def load_benchmark():
    spec = importlib.util.spec_from_file_location("benchmark", REPO / "scripts" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["benchmark"] = module
    spec.loader.exec_module(module)
    return module


def test_epoch_split_counts_each_validation_once():
    """Training steps of 20 ms, 3 validation iterations of 10 ms and a 30 ms metric-like handler per epoch: every
    epoch gets the same split (the evaluator runs once per epoch; its profiler must not count earlier runs again)."""
    benchmark = load_benchmark()
    evaluator = Engine(lambda e, b: time.sleep(0.01))

    class SlowMetric:
        def __call__(self, engine):
            time.sleep(0.03)

    evaluator.add_event_handler(Events.EPOCH_COMPLETED, SlowMetric())
    trainer = Engine(lambda e, b: time.sleep(0.02))
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: evaluator.run([0, 1, 2]))
    split = benchmark.EpochSplit(trainer, evaluator)
    trainer.run([0, 1], max_epochs=3)
    split.finish()
    rows = split.rows()
    assert len(rows) == 3 and len(split.evaluator_profiler.processing_times) == 3  # the last run's 3 iterations
    for row in rows:
        assert row["steps"] == pytest.approx(0.04, abs=0.015)
        assert row["val_forward"] == pytest.approx(0.03, abs=0.015)
        assert row["val_metrics"] == pytest.approx(0.03, abs=0.015)  # named after SlowMetric
        parts = sum(v for k, v in row.items() if k != "total")
        assert parts == pytest.approx(row["total"]) and row["other_handlers"] >= -1e-3


def test_recipe_run_reports_the_split_and_the_pure_compute(tmp_path):
    benchmark = load_benchmark()
    small = {"synthetic_data": {"num_train": 8, "num_valid": 4, "size": [96, 96], "seed": 0}}
    small.update(resize_short_side=80, crop_size=64, num_workers=0)
    r = benchmark.run_recipe("quick_start", 2, tmp_path, small)
    assert len(r["epochs"]) == 2 and r["recipe_epochs"] == 12  # train.json's quick start
    assert all(row["steps"] > 0 and row["val_forward"] > 0 and row["total"] > 0 for row in r["epochs"])
    assert r["pure_compute"]["steps"] > 0 and r["pure_compute"]["validation"] > 0
    assert r["mean_epoch"] == r["epochs"][1]  # epoch 1 (caches) left out of the mean
    startup = r["run_seconds"] - r["epochs"][1]["total"]
    assert r["recipe_minutes"] * 60 == pytest.approx(startup + 11 * r["epochs"][1]["total"])
