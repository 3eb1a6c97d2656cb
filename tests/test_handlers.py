"""The project's Ignite handlers on a bare Ignite engine: schedules, resume loader, loss terms."""

from __future__ import annotations

import json

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
    with pytest.raises(FileNotFoundError, match="holds no readable checkpoint_epoch=N.pt"):
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


# --- non-finite values stop training before the step ------------------------------------------------------------------


def tiny_trainer(loss_fn, images: torch.Tensor, files: list[str]):
    from monai.engines import SupervisedTrainer

    from monai_wsl.handlers import StopOnNonFinite
    from monai_wsl.networks import CAMClassifier

    torch.manual_seed(0)
    encoder = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=4, padding=1), torch.nn.ReLU())
    net = CAMClassifier(encoder=encoder)
    data = [{"image": images, "label": torch.tensor([0, 1]), "image_file": files}]
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=data,
        network=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
        loss_function=loss_fn,
        decollate=False,
    )
    StopOnNonFinite(loss_fn).attach(trainer)
    return trainer, net


def test_non_finite_input_pixels_stop_the_step_and_name_the_image():
    from monai_wsl.handlers import NonFiniteError
    from monai_wsl.losses import WSLCrossEntropyLoss

    images = torch.rand(2, 3, 32, 32)
    images[1, 0, 5, 5] = float("nan")
    trainer, net = tiny_trainer(WSLCrossEntropyLoss(), images, ["a.png", "b.png"])
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(NonFiniteError, match=r"image\(s\) b.png in epoch 1, iteration 1"):
        trainer.run()
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_a_non_finite_loss_term_is_named_and_no_step_is_taken():
    from monai_wsl.handlers import NonFiniteError
    from monai_wsl.losses import MaxMinUncertaintyLoss

    class BrokenSize(MaxMinUncertaintyLoss):
        """A max-min loss whose size term overflows, as a diverging run's would."""

        def forward(self, input, target):
            out = {**input, "logits_bg": input["logits"], "logits_loc": input["logits"]}
            total = super().forward(out, target)
            self.terms["loss_size"] = torch.tensor(float("inf"))
            return total + self.terms["loss_size"]

    trainer, net = tiny_trainer(BrokenSize(), torch.rand(2, 3, 32, 32), ["a.png", "b.png"])
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(NonFiniteError, match=r"the loss is inf \(term\(s\): loss_size\) in epoch 1.*a.png, b.png"):
        trainer.run()
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_non_finite_gradients_stop_before_the_optimiser_step():
    from monai_wsl.handlers import NonFiniteError
    from monai_wsl.losses import WSLCrossEntropyLoss

    trainer, net = tiny_trainer(WSLCrossEntropyLoss(), torch.rand(2, 3, 32, 32), ["a.png", "b.png"])
    net.head.conv.weight.register_hook(lambda grad: grad * float("nan"))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(
        NonFiniteError, match=r"non-finite gradients of 1 parameter\(s\) \(e.g. \['head.conv.weight'\]\)"
    ):
        trainer.run()
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


# --- saves that survive a failure, checkpoints that are checked -------------------------------------------------------


def test_atomic_saves_keep_the_previous_file_until_the_new_one_is_complete(tmp_path):
    from monai_wsl.handlers import AtomicDiskSaver, NonFiniteError

    saver = AtomicDiskSaver(tmp_path)
    saver({"w": torch.ones(3)}, "checkpoint_epoch=1.pt")
    saver.remove("checkpoint_epoch=1.pt")  # what Ignite asks before it saves epoch 2

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("killed half-way through the write")

    with pytest.raises(RuntimeError, match="half-way"):
        saver({"w": torch.ones(3), "x": Unpicklable()}, "checkpoint_epoch=2.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_epoch=1.pt"]  # no partial file, epoch 1 kept
    torch.testing.assert_close(torch.load(tmp_path / "checkpoint_epoch=1.pt")["w"], torch.ones(3))
    with pytest.raises(NonFiniteError, match="not saving .*checkpoint_epoch=2.pt: 1 tensor"):
        saver({"w": torch.tensor([1.0, float("nan")])}, "checkpoint_epoch=2.pt")
    saver({"w": torch.zeros(3)}, "checkpoint_epoch=2.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_epoch=2.pt"]  # epoch 1 removed after
    fixed = AtomicDiskSaver(tmp_path, "model.pt")  # the selected model: one name, replaced in place
    fixed({"w": torch.ones(2)}, "ignored.pt")
    fixed.remove("ignored.pt")
    fixed({"w": torch.full((2,), 2.0)}, "ignored.pt")
    torch.testing.assert_close(torch.load(tmp_path / "model.pt")["w"], torch.full((2,), 2.0))
    assert oct((tmp_path / "model.pt").stat().st_mode & 0o044) == oct(0o044)  # readable by group and others


def test_resume_skips_an_unreadable_newest_checkpoint(tmp_path, caplog):
    good = {"net": torch.nn.Linear(1, 1).state_dict()}
    torch.save(good, tmp_path / "checkpoint_epoch=3.pt")
    (tmp_path / "checkpoint_epoch=4.pt").write_bytes(b"PK\x03\x04 cut short")
    loader = ResumeCheckpointLoader(tmp_path, {"net": torch.nn.Linear(1, 1)})
    assert loader.load_path == str(tmp_path / "checkpoint_epoch=3.pt")
    assert f"skipping {tmp_path / 'checkpoint_epoch=4.pt'}" in caplog.text


def test_checked_loader_names_what_a_checkpoint_holds(tmp_path):
    from monai_wsl.handlers import CheckedCheckpointLoader, describe_state_dict
    from monai_wsl.networks import CAMClassifier, DeepMILNet, MaxMinUncertaintyNet

    maxmin, cam = MaxMinUncertaintyNet(encoder="resnet18"), CAMClassifier(encoder="resnet18", pooling="wildcat")
    assert describe_state_dict(maxmin.state_dict()) == "a MaxMinUncertaintyNet (resnet18 encoder, head of 10 outputs)"
    assert describe_state_dict(cam.state_dict()) == "a CAMClassifier (resnet18 encoder, head of 10 outputs)"
    assert describe_state_dict(DeepMILNet(encoder="resnet18").state_dict()).startswith("a DeepMILNet (resnet18")
    torch.save(cam.state_dict(), tmp_path / "cam.pt")
    with pytest.raises(ValueError, match=r"cam.pt holds a CAMClassifier .* builds MaxMinUncertaintyNet"):
        CheckedCheckpointLoader(tmp_path / "cam.pt", {"model": maxmin})
    torch.save(maxmin.state_dict(), tmp_path / "model.pt")
    loader = CheckedCheckpointLoader(tmp_path / "model.pt", {"model": MaxMinUncertaintyNet(encoder="resnet18")})
    assert loader.load_path == str(tmp_path / "model.pt")


def test_a_damaged_model_card_is_refused_naming_it(tmp_path):
    """A missing card means defaults (a model saved before cards); a damaged one is an error naming the file, not a
    silent fall back to zero padding."""
    from monai_wsl.model_card import read_model_card, trained_setting

    checkpoint = tmp_path / "model.pt"
    assert read_model_card(checkpoint) is None
    assert trained_setting(checkpoint, "padding_mode", "zeros") == "zeros"
    card = tmp_path / "model_card.json"
    card.write_text(json.dumps({"trained_on": {"padding_mode": "replicate"}}))
    assert trained_setting(checkpoint, "padding_mode", "zeros") == "replicate"
    for damaged in ('{"trained_on": {"padding_mode": "repl', "[1, 2]", '{"trained_on": [1]}'):
        card.write_text(damaged)
        with pytest.raises(ValueError, match="model_card.json is damaged"):
            trained_setting(checkpoint, "padding_mode", "zeros")


def test_overlays_follow_the_configured_threshold(tmp_path):
    """The saved and TensorBoard overlays draw ``pred >= threshold`` with the bundle's one ``threshold`` key, as the
    metrics and the saved masks do: a soft mask of 0.4 is painted at threshold 0.3 and not at 0.5."""
    from pathlib import Path
    from types import SimpleNamespace

    import numpy as np
    from monai.bundle import ConfigParser
    from PIL import Image

    from monai_wsl.handlers import OverlaySaver
    from monai_wsl.visualize import COLORS

    image = torch.full((3, 40, 40), -1.0)  # black
    pred = torch.zeros(1, 40, 40)
    pred[:, :20] = 0.4  # the first 20 rows of the upright picture (2D images are transposed for display)
    engine = SimpleNamespace(state=SimpleNamespace(iteration=1, output=[{"image": image, "pred": pred}], batch=None))
    painted = {}
    for threshold in (0.3, 0.5):
        saver = OverlaySaver(str(tmp_path / str(threshold)), label_key=None, threshold=threshold)
        saver(engine)
        picture = np.array(Image.open(tmp_path / str(threshold) / "image_1_0_overlay.png").convert("RGB"))
        teal = np.round(0.45 * np.array(COLORS["pred"]) * 255)  # tint over black
        painted[threshold] = int((np.abs(picture.astype(float) - teal).max(-1) <= 1).sum())
    assert painted[0.3] >= 40 * 20 and painted[0.5] == 0

    from monai_wsl.handlers import TensorBoardOverlayHandler

    class Writer:  # what the handler calls on a SummaryWriter
        def add_image(self, tag, grid, step, dataformats):
            self.grid = grid

        def flush(self):
            pass

    engine.state.epoch = 1
    for threshold in (0.3, 0.5):
        board = TensorBoardOverlayHandler(summary_writer=Writer(), label_key=None, threshold=threshold)
        board.collect(engine)
        board(engine)
        grid = (board.writer.grid.permute(1, 2, 0).numpy() * 255).round()
        painted[threshold] = int((np.abs(grid - teal).max(-1) <= 1).sum())
    assert painted[0.3] >= 40 * 20 and painted[0.5] == 0

    configs = Path(__file__).resolve().parents[1] / "bundle" / "configs"
    parser = ConfigParser()
    parser.read_config([str(configs / "train.json"), str(configs / "evaluate.json")])
    parser.update({"threshold": 0.3, "network_def#pretrained": False, "device": "$torch.device('cpu')"})
    index = [i for i, h in enumerate(parser.get("validate#handlers")) if "OverlaySaver" in str(h)]
    assert len(index) == 1
    assert parser.get_parsed_content(f"validate#handlers#{index[0]}").threshold == 0.3
    parser = ConfigParser()
    parser.read_config(str(configs / "train.json"))
    parser.update({"threshold": 0.3})
    board = [h for h in parser.get("validate#handlers") if "OverlayHandler" in str(h)]
    assert parser.get_parsed_content("validate#postprocessing#transforms#2#threshold") == 0.3
    assert len(board) == 1 and board[0]["threshold"] == "@threshold"


def _summary_on_rank(rank: int, folder: str) -> None:
    """One rank of a 2-process gloo group: a TrainingSummary sees a validation, its model file in the rank's folder."""
    import torch.distributed as dist

    from monai_wsl.handlers import TrainingSummary

    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=2)
    try:
        evaluator = Engine(lambda engine, batch: None)
        summary = TrainingSummary(evaluator, f"{folder}/rank{rank}/model.pt", f"{folder}/rank{rank}/logs")
        summary.attach(Engine(lambda engine, batch: None))
        evaluator.state.metrics = {"val_accuracy": 0.75}
        summary.validated(evaluator)
        assert summary.selected["metrics"] == {"val_accuracy": 0.75}  # every rank knows the selection (resume state)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes: 30 to 90 s of imports
def test_only_rank_0_of_a_ddp_run_writes_the_model_card(tmp_path):
    """Under torchrun every rank runs the same handlers: the model card is written by rank 0 alone (here each rank
    is given its own folder, so a card written by rank 1 would show)."""
    import torch.multiprocessing as mp

    for rank in (0, 1):
        (tmp_path / f"rank{rank}").mkdir()
    mp.spawn(_summary_on_rank, args=(str(tmp_path),), nprocs=2, join=True)
    assert json.loads((tmp_path / "rank0" / "model_card.json").read_text())["validation"] == {"val_accuracy": 0.75}
    assert not (tmp_path / "rank1" / "model_card.json").exists()
