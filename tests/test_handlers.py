"""The project's Ignite handlers on a bare Ignite engine: schedules, resume loader, loss terms."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Engine, Events
from monai.engines.utils import IterationEvents

from monai_wsl.handlers import EpochSeedHandler, LossTermsHandler, ResumeCheckpointLoader, ScheduleHandler


def test_schedule_is_set_from_the_epoch_alone():
    """sigma in epoch e (0-based) is min(0.15 + 0.001 e, 0.2); after an epoch the buffer holds the next epoch's value,
    and an engine that starts at epoch 50 (a resumed run) gets the value of epoch 50 without any saved state."""
    sigma = torch.tensor(0.0)
    seen = []
    engine = Engine(lambda e, b: seen.append(float(sigma)))
    ScheduleHandler("sigma", lambda epoch: min(0.15 + 0.001 * epoch, 0.2), target=sigma).attach(engine)
    engine.run([0], max_epochs=3)
    assert seen == pytest.approx([0.15, 0.151, 0.152])
    assert float(sigma) == pytest.approx(0.153) and engine.state.metrics["sigma"] == pytest.approx(0.152)
    resumed = Engine(lambda e, b: seen.append(float(sigma)))
    ScheduleHandler("sigma", lambda epoch: min(0.15 + 0.001 * epoch, 0.2), target=sigma).attach(resumed)
    resumed.state.epoch = 50  # as a checkpoint restores it
    resumed.run([0], max_epochs=52)
    assert seen[-2:] == pytest.approx([0.2, 0.2])  # epochs 51 and 52, capped


def test_schedule_without_target_only_logs():
    lr = {"value": 0.1}
    engine = Engine(lambda e, b: None)
    ScheduleHandler("lr", lambda epoch: lr["value"]).attach(engine)
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: lr.update(value=lr["value"] / 2))
    logged = []
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: logged.append(e.state.metrics["lr"]))
    engine.run([0], max_epochs=3)
    assert logged == [0.1, 0.05, 0.025]


def test_epoch_seed_makes_an_epoch_depend_on_its_number_only():
    draws = {}
    engine = Engine(lambda e, b: draws.setdefault(e.state.epoch, torch.rand(3)))
    EpochSeedHandler(seed=7).attach(engine)
    engine.run([0], max_epochs=3)
    resumed = Engine(lambda e, b: draws.setdefault(("resumed", e.state.epoch), torch.rand(3)))
    EpochSeedHandler(seed=7).attach(resumed)
    resumed.state.epoch = 2
    torch.rand(5)  # whatever ran before does not matter
    resumed.run([0], max_epochs=3)
    assert torch.equal(draws[("resumed", 3)], draws[3]) and not torch.equal(draws[2], draws[3])


def test_resume_loader_takes_the_newest_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no checkpoint_epoch=N.pt"):
        ResumeCheckpointLoader(tmp_path, {"net": torch.nn.Linear(1, 1)})
    for epoch in (2, 10, 9):
        torch.save({"net": torch.nn.Linear(1, 1).state_dict()}, tmp_path / f"checkpoint_epoch={epoch}.pt")
    loader = ResumeCheckpointLoader(tmp_path, {"net": torch.nn.Linear(1, 1)})
    assert loader.load_path == str(tmp_path / "checkpoint_epoch=10.pt")  # by number, not by name


def test_loss_terms_go_to_the_iteration_output_and_their_epoch_means_to_the_metrics():
    class Loss:
        terms = {}

    loss = Loss()

    def step(engine, batch):
        loss.terms = {"loss_a": torch.tensor(float(batch)), "loss_b": torch.tensor(2.0 * batch)}
        engine.state.output = {"loss": torch.tensor(3.0 * batch)}
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        return engine.state.output

    engine = Engine(step)
    engine.register_events(*IterationEvents)
    LossTermsHandler(loss, prefix="train_").attach(engine)
    outputs = []
    engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: outputs.append(dict(e.state.output)))
    engine.run([1, 3], max_epochs=1)
    assert float(outputs[1]["loss_b"]) == 6.0
    assert engine.state.metrics == pytest.approx({"train_loss_a": 2.0, "train_loss_b": 4.0, "train_loss": 6.0})
