"""SPD stage-2 losses: MONAI Dice + focal and Pairwise Slice Consistency."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("monai")

from SPDSegmentLib.research import losses  # noqa: E402


def disc(h=32, w=32, centre=(16, 16), radius=8.0):
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                            indexing="ij")
    return (((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) <= radius ** 2).float()[None, None]


def test_psc_identical_maps_is_zero():
    torch.manual_seed(0)
    soft = torch.rand(3, 1, 16, 16)
    assert float(losses.pairwise_slice_consistency(soft, soft.clone())) == pytest.approx(0.0, abs=1e-6)
    binary = disc()
    assert float(losses.pairwise_slice_consistency(binary, binary)) == pytest.approx(0.0, abs=1e-6)
    empty = torch.zeros(2, 1, 8, 8)
    assert float(losses.pairwise_slice_consistency(empty, empty)) == pytest.approx(0.0, abs=1e-6)


def test_psc_disjoint_maps_is_one():
    a = torch.zeros(2, 1, 16, 16)
    b = torch.zeros(2, 1, 16, 16)
    a[..., :8] = 1.0
    b[..., 8:] = 1.0
    assert float(losses.pairwise_slice_consistency(a, b)) == pytest.approx(1.0, abs=1e-6)


def test_psc_half_overlap_known_value():
    a = torch.zeros(1, 1, 16, 16)
    b = torch.zeros(1, 1, 16, 16)
    a[..., 0:8] = 1.0  # 128 pixels
    b[..., 4:12] = 1.0  # 128 pixels, 64 shared: dice = 2 * 64 / 256 = 0.5
    assert float(losses.pairwise_slice_consistency(a, b)) == pytest.approx(0.5, abs=1e-6)
    half = torch.full((1, 1, 4, 4), 0.5)
    one = torch.ones(1, 1, 4, 4)
    # soft: 2 * sum(0.5) / (sum(0.25) + sum(1)) = 16 / 20 = 0.8 -> loss 0.2
    assert float(losses.pairwise_slice_consistency(half, one)) == pytest.approx(0.2, abs=1e-6)


def test_psc_averages_over_batch():
    a = torch.zeros(2, 1, 8, 8)
    b = torch.zeros(2, 1, 8, 8)
    a[0, ..., :4] = 1.0
    b[0, ..., :4] = 1.0  # identical -> 0
    a[1, ..., :4] = 1.0
    b[1, ..., 4:] = 1.0  # disjoint -> 1
    assert float(losses.pairwise_slice_consistency(a, b)) == pytest.approx(0.5, abs=1e-6)


def test_psc_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        losses.pairwise_slice_consistency(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 5))
    with pytest.raises(ValueError):
        losses.pairwise_slice_consistency(torch.zeros(1, 4, 4), torch.zeros(1, 4, 4))


def test_dice_focal_prefers_good_prediction():
    target = disc()
    good = (target * 2 - 1) * 6.0  # confident and right
    bad = -good  # confident and wrong
    vague = torch.zeros_like(target)
    lg, lv, lb = (float(losses.dice_focal_loss(x, target)) for x in (good, vague, bad))
    assert lg < lv < lb
    assert lg < 0.05


def test_dice_focal_uses_monai():
    from monai.losses import DiceFocalLoss

    torch.manual_seed(1)
    logits = torch.randn(2, 1, 12, 12)
    target = (torch.rand(2, 1, 12, 12) > 0.5).float()
    reference = DiceFocalLoss(sigmoid=True, gamma=2.0, lambda_dice=1.0, lambda_focal=1.0)(logits, target)
    assert float(losses.dice_focal_loss(logits, target)) == pytest.approx(float(reference), rel=1e-6)
    assert losses._dice_focal() is losses._dice_focal()  # built once


def test_gradients_flow_and_parts_add_up():
    torch.manual_seed(2)
    target_t = disc(centre=(15, 16))
    target_t1 = disc(centre=(17, 16))
    logits_t = torch.randn(1, 1, 32, 32, requires_grad=True)
    logits_t1 = torch.randn(1, 1, 32, 32, requires_grad=True)
    total, parts = losses.spd_stage2_loss(logits_t, logits_t1, target_t, target_t1, psc_weight=0.5)
    assert set(parts) == {"dice_focal_t", "dice_focal_t1", "psc", "psc_weighted", "total"}
    assert all(isinstance(v, float) for v in parts.values())
    assert parts["psc_weighted"] == pytest.approx(0.5 * parts["psc"], rel=1e-6)
    assert parts["total"] == pytest.approx(parts["dice_focal_t"] + parts["dice_focal_t1"] + parts["psc_weighted"],
                                           rel=1e-6)
    assert float(total.detach()) == pytest.approx(parts["total"], rel=1e-6)
    total.backward()
    for logits in (logits_t, logits_t1):
        assert logits.grad is not None and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    # psc_weight 0 removes the consistency term
    total0, parts0 = losses.spd_stage2_loss(logits_t, logits_t1, target_t, target_t1, psc_weight=0.0)
    assert parts0["total"] == pytest.approx(parts0["dice_focal_t"] + parts0["dice_focal_t1"], rel=1e-6)


def test_psc_gradient_pulls_slices_together():
    a = torch.full((1, 1, 8, 8), 0.2, requires_grad=True)
    b = torch.zeros(1, 1, 8, 8)
    b[..., :4] = 1.0
    loss = losses.pairwise_slice_consistency(a, b)
    loss.backward()
    # raising a where b is 1 lowers the loss
    assert (a.grad[..., :4] < 0).all()
