from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from monai_wsl.networks import CAMClassifier, MaskOutput, MaxMinUncertaintyNet, WildcatHead, soft_mask, wildcat_pool
from monai_wsl.networks.blocks import global_pool, num_selected
from monai_wsl.networks.utils import minmax_normalize


def test_wildcat_pool_matches_hand_computation():
    # One 2 x 3 map with values 1..6: kmax=2/6 -> top two {6, 5}; kmin=2 (a count) -> bottom two {1, 2}.
    maps = torch.tensor([[[[3.0, 1.0, 6.0], [2.0, 5.0, 4.0]]]])
    assert wildcat_pool(maps, kmax=2 / 6, kmin=0).item() == pytest.approx((6 + 5) / 2)
    assert wildcat_pool(maps, kmax=2 / 6, kmin=2, alpha=0.6).item() == pytest.approx((6 + 5) / 2 + 0.6 * (1 + 2) / 2)
    # kmax as a count, kmin as a fraction (0.5 of 6 -> 3 values {1, 2, 3}), negative alpha.
    assert wildcat_pool(maps, kmax=1, kmin=0.5, alpha=-1.0).item() == pytest.approx(6 - (1 + 2 + 3) / 3)


def test_num_selected_conventions():
    assert num_selected(0.3, 169) == 51  # the GlaS recipe on a 13 x 13 map
    assert num_selected(0.001, 10) == 1  # a fraction keeps at least one position
    assert num_selected(4, 3) == 3 and num_selected(0, 10) == 0


def test_wildcat_head_averages_modalities_class_major():
    head = WildcatHead(2, in_channels=1, num_classes=2, modalities=3, kmax=1.0, dropout=0.0)
    with torch.no_grad():
        head.conv.weight.copy_(torch.arange(6.0).view(6, 1, 1, 1))  # channel c = c * x
        head.conv.bias.zero_()
    x = torch.ones(1, 1, 4, 5)
    scores, maps = head(x)
    assert maps.shape == (1, 2, 4, 5) and scores.shape == (1, 2)
    # class 0 = mean of channels 0, 1, 2 -> 1; class 1 = mean of 3, 4, 5 -> 4; kmax=1.0 keeps every value.
    torch.testing.assert_close(scores, torch.tensor([[1.0, 4.0]]))


def test_wildcat_dropout_only_in_training():
    head = WildcatHead(2, 8, 2, dropout=0.5)
    x = torch.randn(2, 8, 6, 6)
    head.eval()
    torch.testing.assert_close(head(x)[0], head(x)[0])
    head.train()
    torch.manual_seed(0)
    a = head(x)[0]
    torch.manual_seed(1)
    assert not torch.allclose(a, head(x)[0])


def test_global_poolings():
    maps = torch.tensor([[[[0.0, 1.0], [2.0, 5.0]]]])
    assert global_pool(maps, "avg").item() == pytest.approx(2.0)
    assert global_pool(maps, "max").item() == pytest.approx(5.0)
    lse = global_pool(maps, "lse", lse_r=1.0).item()
    assert lse == pytest.approx(torch.log(torch.exp(maps).mean()).item())
    assert 2.0 < lse < 5.0


def test_soft_mask_formula_and_per_image_normalisation():
    maps = torch.zeros(2, 2, 2, 2)
    maps[0, 0] = torch.tensor([[0.0, 1.0], [2.0, 4.0]])
    maps[1, 1] = torch.tensor([[10.0, 0.0], [0.0, 0.0]])  # another image with another range
    scores = torch.tensor([[50.0, -50.0], [-50.0, 50.0]])  # softmax ~ one-hot
    m = soft_mask(maps, scores, (2, 2), sigma=0.15, w=5.0)
    expected0 = torch.sigmoid(5 * (torch.tensor([[0.0, 0.25], [0.5, 1.0]]) - 0.15))
    torch.testing.assert_close(m[0, 0], expected0)
    # per image: image 1's max (10) does not rescale image 0
    torch.testing.assert_close(m[1, 0, 0, 0], torch.sigmoid(torch.tensor(5 * 0.85)))
    # M >= 0.5 exactly where A_norm >= sigma
    assert torch.equal(m[0, 0] >= 0.5, torch.tensor([[False, True], [True, True]]))


def test_batch_normalisation_of_the_soft_mask_in_training_only():
    """``train_mask_norm="batch"`` (the authors' training code): one min and max over the batch in training, so an
    image with a weaker map gets a smaller mask than alone; per image in eval mode, as the paper."""
    maps = torch.zeros(2, 2, 2, 2)
    maps[0, 0] = torch.tensor([[0.0, 1.0], [2.0, 4.0]])
    maps[1, 1] = torch.tensor([[10.0, 0.0], [0.0, 0.0]])
    scores = torch.tensor([[50.0, -50.0], [-50.0, 50.0]])
    m = soft_mask(maps, scores, (2, 2), sigma=0.15, w=5.0, per_image=False)
    torch.testing.assert_close(m[0, 0], torch.sigmoid(5 * (torch.tensor([[0.0, 0.1], [0.2, 0.4]]) - 0.15)))
    torch.testing.assert_close(m[1, 0, 0, 0], torch.sigmoid(torch.tensor(5 * 0.85)))
    torch.manual_seed(0)
    net = MaxMinUncertaintyNet(encoder="resnet18", train_mask_norm="batch", wildcat={"dropout": 0.0})
    x = torch.rand(2, 3, 64, 64)
    x[1] *= 0.1  # another range of activations, so the two normalisations differ
    with torch.no_grad():
        net.train()
        for module in net.modules():  # batch statistics would differ with the batch: use the running ones
            if isinstance(module, nn.BatchNorm2d):
                module.eval()
        batch = net.localize(x)[2]
        per_image = torch.cat([net.localize(x[i : i + 1])[2] for i in range(2)])
        net.eval()
        evaluated = net.localize(x)[2]
    torch.testing.assert_close(evaluated, per_image)
    assert not torch.allclose(batch, per_image)
    assert batch.amax() == pytest.approx(float(per_image.amax()), abs=1e-6)  # the batch's max image reaches 1
    with pytest.raises(ValueError, match="train_mask_norm"):
        MaxMinUncertaintyNet(encoder="resnet18", train_mask_norm="slide")


def test_constant_map_is_guarded():
    out = minmax_normalize(torch.full((1, 1, 3, 3), 7.0))
    assert torch.isfinite(out).all() and (out == 0).all()


@pytest.mark.parametrize("spatial_dims,size", [(2, (64, 80)), (3, (48, 48, 40))])
def test_maxmin_output_shapes(spatial_dims, size):
    net = MaxMinUncertaintyNet(spatial_dims=spatial_dims, num_classes=3, encoder="resnet18")
    x = torch.rand(2, 3, *size)
    out = net(x)
    low = tuple((s + 31) // 32 for s in size)
    assert out["logits"].shape == out["logits_bg"].shape == out["logits_loc"].shape == (2, 3)
    assert out["mask"].shape == (2, 1, *size)
    assert out["cams"].shape == (2, 3, *low)
    assert ((out["mask"] > 0) & (out["mask"] < 1)).all()
    pred = MaskOutput(net).eval()(x)
    assert pred.shape == (2, 2, *size)
    torch.testing.assert_close(pred.sum(1), torch.ones(2, *size))


def test_predict_and_segment_run_only_the_passes_they_need():
    torch.manual_seed(0)
    net = MaxMinUncertaintyNet(encoder="resnet18").eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        out, pred = net(x), net.predict(x)
    assert set(pred) == {"mask", "logits"}
    torch.testing.assert_close(pred["mask"], out["mask"])
    torch.testing.assert_close(pred["logits"], out["logits"])
    classifier_calls = []
    net.classifier_head.register_forward_hook(lambda *args: classifier_calls.append(1))
    with torch.no_grad():
        torch.testing.assert_close(net.segment(x), out["mask"])  # the exported mask: the localizer pass only
        torch.testing.assert_close(MaskOutput(net)(x)[:, 1:], out["mask"])
    assert not classifier_calls


def test_mask_output_has_the_networks_state_dict_and_mask():
    torch.manual_seed(0)
    trained = MaxMinUncertaintyNet(encoder="resnet18").eval()
    trained.sigma.fill_(0.2)
    served = MaskOutput(MaxMinUncertaintyNet(encoder="resnet18")).eval()
    assert list(served.state_dict()) == list(trained.state_dict())  # no "network." prefix: model.pt loads as is
    assert not list(served.parameters()) or all(
        p is q for p, q in zip(served.parameters(), served.network.parameters())
    )
    served.load_state_dict(trained.state_dict(), strict=True)
    assert served.network.sigma.item() == pytest.approx(0.2)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        m = trained(x)["mask"]
        torch.testing.assert_close(served(x), torch.cat([1 - m, m], 1))
        torch.testing.assert_close(served.predict(x)["logits"], trained(x)["logits"])


def test_separate_encoders_have_own_parameters():
    shared = MaxMinUncertaintyNet(encoder="resnet18")
    separate = MaxMinUncertaintyNet(encoder="resnet18", shared_encoder=False)
    n_shared = sum(p.numel() for p in shared.parameters())
    n_separate = sum(p.numel() for p in separate.parameters())
    n_encoder = sum(p.numel() for p in shared.encoder.parameters())
    assert n_separate == n_shared + n_encoder
    assert separate(torch.rand(1, 3, 64, 64))["logits"].shape == (1, 2)


def test_gradients_of_fg_ce_and_bg_term_reach_the_localizer():
    from monai_wsl.losses import uniformity

    torch.manual_seed(0)
    net = MaxMinUncertaintyNet(encoder="resnet18", wildcat={"dropout": 0.0})
    x, y = torch.rand(2, 3, 64, 64), torch.tensor([0, 1])
    for term in (
        lambda o: nn.functional.cross_entropy(o["logits"], y),
        lambda o: uniformity(o["logits_bg"], "sem").mean(),
    ):
        net.zero_grad()
        term(net(x)).backward()
        grad = net.localizer_head.conv.weight.grad
        assert grad is not None and grad.abs().sum() > 0


def test_custom_encoder_module_is_measured():
    encoder = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=4, padding=1)
    )
    net = MaxMinUncertaintyNet(encoder=encoder)
    assert net.encoder.out_channels == 16 and net.encoder.output_stride == 8
    assert net.min_spatial_size == 10  # ceil(8 / 0.8)
    assert net(torch.rand(1, 3, 24, 24))["cams"].shape == (1, 2, 3, 3)


def test_cam_classifier_map_is_predicted_class_map():
    torch.manual_seed(0)
    net = CAMClassifier(encoder="resnet18", pooling="avg").eval()
    x = torch.rand(2, 3, 64, 64)
    out = net(x)
    assert out["mask"].shape == (2, 1, 64, 64)
    assert out["mask"].amin() >= 0 and out["mask"].amax() <= 1
    # avg pooling: logits are the spatial means of the class maps (CAM = GAP + linear)
    torch.testing.assert_close(out["logits"], out["cams"].mean((2, 3)))
    for pooling in ("max", "lse", "wildcat"):
        assert CAMClassifier(encoder="resnet18", pooling=pooling)(x)["logits"].shape == (2, 2)


def test_bad_inputs_raise_clear_errors():
    net = MaxMinUncertaintyNet(encoder="resnet18")
    with pytest.raises(ValueError, match="expected 3 input channels.*got 4.*RGBA"):
        net(torch.rand(1, 4, 64, 64))
    with pytest.raises(ValueError, match="4-d input.*got shape \\(3, 64, 64\\).*batch dimension"):
        net(torch.rand(3, 64, 64))
    with pytest.raises(ValueError, match="too small.*at least 40"):
        net(torch.rand(1, 3, 39, 64))
    with pytest.raises(ValueError, match="floating-point"):
        net(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(TypeError, match="output"):  # a setting the network does not take is an error
        MaxMinUncertaintyNet(output="probabilities")
    with pytest.raises(ValueError, match="encoder must be"):
        MaxMinUncertaintyNet(encoder="vgg16")
    with pytest.raises(ValueError, match="no offline ImageNet weights.*pretrained_path"):
        MaxMinUncertaintyNet(encoder="resnet18", pretrained=True)


def _sync_batchnorm_worker(rank: int, port: int, results) -> None:
    import os

    import torch.distributed as dist

    from monai_wsl.losses import MaxMinUncertaintyLoss
    from monai_wsl.networks import CPUSyncBatchNorm, convert_sync_batchnorm

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    encoder = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        nn.Conv2d(8, 16, 3, stride=4, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
    )  # fmt: skip
    net = MaxMinUncertaintyNet(encoder=encoder, wildcat={"dropout": 0.0}).double().train()
    x = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 1
    y = torch.tensor([0, 1, 0, 1])
    whole = MaxMinUncertaintyLoss()(net(x), y)  # one process, the whole batch
    whole.backward()
    reference = torch.cat([p.grad.flatten() for p in net.parameters()])
    reference_stats = net.encoder[1].running_var.clone()
    net.zero_grad()
    for m in net.modules():
        if hasattr(m, "reset_running_stats"):
            m.reset_running_stats()
    convert_sync_batchnorm(net)
    assert type(net.encoder[1]) is CPUSyncBatchNorm
    ddp = torch.nn.parallel.DistributedDataParallel(net)  # kept alive: its hooks average the gradients in backward
    half = MaxMinUncertaintyLoss()(ddp(x[rank::2]), y[rank::2])
    half.backward()
    losses = torch.stack([half.detach()] * 2)
    dist.all_gather_into_tensor(losses, half.detach().reshape(1))
    gradient = torch.cat([p.grad.flatten() for p in net.parameters()])
    results.put((rank, float(losses.mean() - whole), float((gradient - reference).norm() / reference.norm()),
                 float((net.encoder[1].running_var - reference_stats).abs().max())))  # fmt: skip
    dist.destroy_process_group()
    # leave without Python's teardown: deallocating the DDP reducer (the last owner of the gloo group) while a gloo
    # worker thread drops a tensor now and then deadlocks (the main thread holds the GIL and joins that thread, which
    # waits for the GIL); the results are flushed first
    results.close()
    results.join_thread()
    os._exit(0)


def test_cpu_sync_batchnorm_trains_as_one_process_with_the_whole_batch():
    """Two gloo processes with half a batch each, SyncBatchNorm and DDP: in float64, the same mean loss, gradients and
    running statistics as one process with the whole batch (per-process BatchNorm would differ in all three)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.get_context("spawn")
    results = context.Queue()
    # daemons: a worker that hangs is ended with the test session instead of holding it open
    processes = [context.Process(target=_sync_batchnorm_worker, args=(r, port, results), daemon=True) for r in (0, 1)]
    for p in processes:
        p.start()
    outcome = [results.get(timeout=120) for _ in processes]
    for p in processes:
        p.join(timeout=60)
        if p.is_alive():
            p.kill()
            p.join(timeout=10)  # its exit code (-9) rather than None
        assert p.exitcode == 0, p.exitcode
    for _, loss_diff, gradient_diff, stats_diff in outcome:
        # the loss terms are computed in float32 (as in mixed precision), the network in float64
        assert abs(loss_diff) < 1e-6 and gradient_diff < 1e-9 and stats_diff < 1e-10, (loss_diff, gradient_diff)


def test_inferer_at_the_training_scale_returns_the_mask_at_the_images_size():
    """``WSLInferer(short_side=N)``: the network sees the image resized as the training resized it (short side N,
    ResizeShortSide), the mask comes back at the image's size, the logits are those of the resized image."""
    from monai_wsl.inferers import WSLInferer
    from monai_wsl.networks.utils import upsample
    from monai_wsl.transforms import ResizeShortSide

    torch.manual_seed(0)
    net = MaxMinUncertaintyNet(encoder="resnet18").eval()
    x = torch.rand(2, 3, 96, 144)
    with torch.no_grad():
        out = WSLInferer(short_side=64)(x, net)
        small = net.predict(torch.stack([ResizeShortSide(64)(img) for img in x]))
        same = WSLInferer(short_side=96)(x, net)
        plain = WSLInferer()(x, net)
    assert small["mask"].shape == (2, 1, 64, 96) and out["mask"].shape == (2, 1, 96, 144)
    torch.testing.assert_close(out["mask"], upsample(small["mask"], (96, 144)))
    torch.testing.assert_close(out["logits"], small["logits"])
    torch.testing.assert_close(same["mask"], plain["mask"])  # already at that scale: untouched
    assert not torch.allclose(out["mask"], plain["mask"])
    with pytest.raises(ValueError, match="short_side"):
        WSLInferer(short_side=0)


def test_inferer_flips_average_the_mask_over_every_flip_and_keep_the_class():
    from monai_wsl.inferers import WSLInferer

    torch.manual_seed(0)
    net = MaxMinUncertaintyNet(encoder="resnet18").eval()
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        out = WSLInferer(flips=True)(x, net)
        plain = net.predict(x)
        masks = [net.segment(x.flip(d)).flip(d) if d else net.segment(x) for d in [(), (2,), (3,), (2, 3)]]
        both = WSLInferer(short_side=48, flips=True)(x, net)
    torch.testing.assert_close(out["mask"], torch.stack(masks).mean(0))
    torch.testing.assert_close(out["logits"], plain["logits"])
    assert not torch.allclose(out["mask"], plain["mask"])  # the network is not flip-equivariant by itself
    assert both["mask"].shape == (1, 1, 64, 96)


def test_inferer_flips_switch_reads_false_from_the_command_line():
    """``--eval_flips false`` reaches the inferer as the string "false" (Fire): it must mean no flips."""
    from monai_wsl.inferers import WSLInferer

    assert WSLInferer(flips="false").flips is False and WSLInferer(flips="true").flips is True
    assert WSLInferer(flips=False).flips is False
