from __future__ import annotations

import math

import pytest
import torch

from monai_wsl.losses import ExtendedLogBarrier, MaxMinUncertaintyLoss, UniformityLoss, extended_log_barrier, uniformity
from monai_wsl.networks import MaxMinUncertaintyNet


@pytest.mark.parametrize("t", [5.0, 7.3])
def test_extended_log_barrier_value_and_gradient_on_both_branches(t):
    z = torch.tensor([-3.0, -1.0 / t**2 - 1e-3, -1.0 / t**2 + 1e-3, 0.0, 2.0], dtype=torch.float64, requires_grad=True)
    psi = extended_log_barrier(z, t)
    zs = z.detach().tolist()
    expected = [
        -math.log(-zs[0]) / t,
        -math.log(-zs[1]) / t,
        t * zs[2] - math.log(1 / t**2) / t + 1 / t,
        -math.log(1 / t**2) / t + 1 / t,
        t * zs[4] - math.log(1 / t**2) / t + 1 / t,
    ]
    torch.testing.assert_close(psi, torch.tensor(expected, dtype=torch.float64))
    psi.sum().backward()
    # d/dz of -(1/t) ln(-z) is -1/(t z); of the linear branch, t
    expected_grad = [-1 / (t * zs[0]), -1 / (t * zs[1]), t, t, t]
    torch.testing.assert_close(z.grad, torch.tensor(expected_grad, dtype=torch.float64))


def test_extended_log_barrier_is_continuous_at_the_switch():
    t = 5.0
    z0 = -1.0 / t**2
    eps = 1e-7
    z = torch.tensor([z0 - eps, z0 + eps], dtype=torch.float64)
    left, right = extended_log_barrier(z, t)
    assert left.item() == pytest.approx(right.item(), abs=1e-5)


def test_barrier_module_t_is_a_buffer():
    barrier = ExtendedLogBarrier(5.0)
    assert "t" in barrier.state_dict()
    barrier.t.fill_(7.3)  # as the bundle's schedule sets it
    z = torch.tensor([-3.0, 0.5])
    torch.testing.assert_close(barrier(z), extended_log_barrier(z, 7.3))
    with pytest.raises(ValueError, match="t must be > 0"):
        ExtendedLogBarrier(0.0)


@pytest.mark.parametrize("mode,minimum", [("sem", 1.0), ("eem", -1.0)])
def test_uniformity_is_minimal_at_uniform_and_finite_when_saturated(mode, minimum):
    uniform = uniformity(torch.zeros(1, 2), mode).item()
    assert uniform == pytest.approx(minimum)  # log2(2) bits for SEM, -log2(2) for EEM
    for p in (0.6, 0.9, 0.999):
        logit = math.log(p / (1 - p))
        assert uniformity(torch.tensor([[logit, 0.0]]), mode).item() > uniform
    saturated = uniformity(torch.tensor([[1e4, -1e4], [-1e4, 1e4]]), mode)
    assert torch.isfinite(saturated).all()
    # SEM of a saturated posterior is (0 + 2e4) / (2 ln 2) bits; EEM tends to 0 (a certain posterior).
    expected = 2e4 / (2 * math.log(2)) if mode == "sem" else 0.0
    torch.testing.assert_close(saturated, torch.full((2,), expected), rtol=1e-5, atol=1e-5)


def test_uniformity_minimum_for_more_classes_and_gradient_is_finite():
    logits = torch.tensor([[1e4, 0.0, -1e4, 3.0]], requires_grad=True)
    for mode, minimum in (("sem", 2.0), ("eem", -2.0)):
        assert uniformity(torch.zeros(1, 4), mode).item() == pytest.approx(minimum)
        UniformityLoss(mode)(logits).backward()
        assert torch.isfinite(logits.grad).all()


def _fake_output(batch=3, k=2, size=(8, 8), mask_value=None, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(batch, 1, *size, generator=g) if mask_value is None else torch.full((batch, 1, *size), mask_value)
    return {
        "logits": torch.randn(batch, k, generator=g) * scale,
        "logits_bg": torch.randn(batch, k, generator=g) * scale,
        "logits_loc": torch.randn(batch, k, generator=g) * scale,
        "mask": mask,
    }


def test_total_equals_sum_of_terms_and_each_term_formula():
    out, y = _fake_output(), torch.tensor([0, 1, 1])
    loss_fn = MaxMinUncertaintyLoss(lambda_bg=0.3, bg_term="eem", t=5.0)
    total = loss_fn(out, y)
    terms = loss_fn.terms
    assert set(terms) == {"loss_ce_loc", "loss_ce_fg", "loss_bg", "loss_size"}
    torch.testing.assert_close(total, sum(terms.values()))
    ce = torch.nn.functional.cross_entropy
    torch.testing.assert_close(terms["loss_ce_loc"], ce(out["logits_loc"], y))
    torch.testing.assert_close(terms["loss_ce_fg"], ce(out["logits"], y))
    torch.testing.assert_close(terms["loss_bg"], 0.3 * uniformity(out["logits_bg"], "eem").mean())
    s_fg = out["mask"].flatten(1).sum(1)
    s_bg = (1 - out["mask"]).flatten(1).sum(1)
    size = (-(torch.log(s_fg) + torch.log(s_bg)) / 5.0).mean()  # both sizes are far inside the log branch
    torch.testing.assert_close(terms["loss_size"], size)


def test_ablation_switches():
    out, y = _fake_output(), torch.tensor([0, 1, 0])
    fg_only = MaxMinUncertaintyLoss(lambda_bg=0.0, size_constraint=False)
    total = fg_only(out, y)
    assert fg_only.terms["loss_bg"].item() == 0 and fg_only.terms["loss_size"].item() == 0
    torch.testing.assert_close(total, fg_only.terms["loss_ce_loc"] + fg_only.terms["loss_ce_fg"])
    assert MaxMinUncertaintyLoss(size_constraint="false").size_constraint is False  # as a command line passes it
    no_bg = MaxMinUncertaintyLoss(bg_term=None, lambda_bg=1.0)
    no_bg(out, y)
    assert no_bg.terms["loss_bg"].item() == 0 and no_bg.terms["loss_size"].item() != 0
    per_image = MaxMinUncertaintyLoss(reduction="none")(out, y)
    assert per_image.shape == (3,)
    torch.testing.assert_close(per_image.mean(), MaxMinUncertaintyLoss()(out, y))


def test_min_foreground_barrier_holds_the_mask_above_a_fraction():
    """min_foreground adds psi_t(r - S+ / N) to the size term: the formula, zero effect at 0 (the paper's loss), and a
    gradient that grows the mask (more strongly the smaller it is), with bad fractions refused."""
    from monai_wsl.losses import extended_log_barrier

    out, y = _fake_output(), torch.tensor([0, 1, 1])
    plain, held = MaxMinUncertaintyLoss(), MaxMinUncertaintyLoss(min_foreground=0.3)
    plain(out, y), held(out, y)
    fraction = out["mask"].flatten(1).mean(1)
    extra = extended_log_barrier(0.3 - fraction, 5.0).mean()
    torch.testing.assert_close(held.terms["loss_size"], plain.terms["loss_size"] + extra)
    assert MaxMinUncertaintyLoss(min_foreground=0.0)(out, y) == plain(out, y)
    grads = []
    for value in (0.2, 0.5):  # a mask of 20 % and one of 50 % of the image
        mask = torch.full((1, 1, 8, 8), value, requires_grad=True)
        out1 = {k: v[:1] for k, v in out.items() if k != "mask"} | {"mask": mask}
        MaxMinUncertaintyLoss(min_foreground=0.3, lambda_bg=0.0)(out1, y[:1]).backward()
        no_floor = mask.detach().clone().requires_grad_(True)
        MaxMinUncertaintyLoss(lambda_bg=0.0)({**out1, "mask": no_floor}, y[:1]).backward()
        grads.append(float((mask.grad - no_floor.grad).sum()))
    assert grads[0] < grads[1] < 0  # descending the loss grows the mask, more below the floor than above it
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="min_foreground"):
            MaxMinUncertaintyLoss(min_foreground=bad)


@pytest.mark.parametrize("mask_value", [0.0, 1.0])
def test_loss_finite_for_empty_and_full_masks_and_saturated_logits(mask_value):
    out = _fake_output(mask_value=mask_value, scale=1e4)
    for key in out:
        out[key].requires_grad_(True)
    loss = MaxMinUncertaintyLoss(lambda_bg=1.0)(out, torch.tensor([0, 1, 1]))
    assert torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(out[k].grad).all() for k in out)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_loss_finite_under_autocast(dtype):
    torch.manual_seed(0)
    # A small encoder: CPU fp16 convolutions are slow, and the point here is the loss's numerics.
    encoder = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 8, stride=8), torch.nn.ReLU(), torch.nn.Conv2d(8, 16, 4, stride=4)
    )
    net = MaxMinUncertaintyNet(encoder=encoder)
    loss_fn = MaxMinUncertaintyLoss(lambda_bg=1.0)
    x = torch.rand(2, 3, 416, 416)  # 173,056 pixels: an fp16 sum of the mask would overflow (max 65,504)
    with torch.autocast("cpu", dtype=dtype):
        out = net(x)
        out["mask"] = torch.ones_like(out["mask"])  # a full mask: the size term sits at its linear branch
        loss = loss_fn(out, torch.tensor([0, 1]))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(torch.isfinite(v) for v in loss_fn.terms.values())
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


def test_bad_labels_and_outputs_raise():
    out = _fake_output()
    loss_fn = MaxMinUncertaintyLoss()
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\), got \[2\]"):
        loss_fn(out, torch.tensor([0, 2, 1]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\), got \[-1\]"):
        loss_fn(out, torch.tensor([[0], [-1], [1]]))
    with pytest.raises(ValueError, match="shape \\(3,\\) or \\(3, 1\\)"):
        loss_fn(out, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="non-integer"):
        loss_fn(out, torch.tensor([0.0, 0.5, 1.0]))
    with pytest.raises(ValueError, match="dict output with keys"):
        loss_fn({"logits": out["logits"], "mask": out["mask"]}, torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="bg_term"):
        MaxMinUncertaintyLoss(bg_term="entropy")
