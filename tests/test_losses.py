"""Tests of contrastive_loss / triplet_loss and their modules against float64 loop references."""

from __future__ import annotations

import math
import re

import pytest
import torch

import deepagg
from deepagg import functional as F
from deepagg._checks import DeviceError, DTypeError, ShapeError

from ._base import BaseTester

# --------------------------------------------------------------------------------------------------------------
# Slow, obviously-correct references: Python loops over tuples and negatives, float64 scalars.
# --------------------------------------------------------------------------------------------------------------


def _sq(a: torch.Tensor, b: torch.Tensor) -> float:
    return sum((float(x) - float(y)) ** 2 for x, y in zip(a, b, strict=True))


def ref_contrastive(a, p, n, mask, margin: float, eps: float = 1e-12) -> float:
    t_count, k_count = n.shape[0], n.shape[1]
    total = 0.0
    for t in range(t_count):
        loss = 0.5 * (math.sqrt(_sq(a[t], p[t]) + eps)) ** 2
        for k in range(k_count):
            if mask is None or bool(mask[t, k]):
                d = math.sqrt(_sq(a[t], n[t, k]) + eps)
                loss += 0.5 * max(0.0, margin - d) ** 2
        total += loss
    return total / t_count if t_count else 0.0


def ref_triplet(a, p, n, mask, margin: float) -> float:
    t_count, k_count = n.shape[0], n.shape[1]
    total = 0.0
    for t in range(t_count):
        for k in range(k_count):
            if mask is None or bool(mask[t, k]):
                total += max(0.0, _sq(a[t], p[t]) - _sq(a[t], n[t, k]) + margin)
    return total / t_count if t_count else 0.0


def make_tuples(t: int, k: int, d: int, seed: int = 0, dtype: torch.dtype = torch.float64):
    """L2-normalised anchors, positives near the anchors, negatives anywhere on the sphere; a padding mask with
    some all-padding rows; NaN and inf garbage in the padded slots."""
    g = torch.Generator().manual_seed(seed)
    a = torch.nn.functional.normalize(torch.randn(t, d, generator=g, dtype=torch.float64), dim=-1)
    p = torch.nn.functional.normalize(a + 0.4 * torch.randn(t, d, generator=g, dtype=torch.float64), dim=-1)
    n = torch.nn.functional.normalize(torch.randn(t, k, d, generator=g, dtype=torch.float64), dim=-1)
    mask = torch.rand(t, k, generator=g) < 0.7
    if t > 1:
        mask[1] = False  # a tuple with no real negative
    garbage = n.clone()
    garbage[~mask] = float("nan")
    if k > 1:
        garbage[~mask[:, 0], 0] = float("inf")
    return a.to(dtype), p.to(dtype), n.to(dtype), garbage.to(dtype), mask


LOSSES = {
    "contrastive": (F.contrastive_loss, deepagg.ContrastiveLoss, ref_contrastive, 0.7),
    "triplet": (F.triplet_loss, deepagg.TripletLoss, ref_triplet, 0.1),
}


@pytest.mark.parametrize("name", list(LOSSES))
class TestTupleLosses(BaseTester):
    def test_smoke(self, name: str, device: torch.device, dtype: torch.dtype) -> None:
        fn, module, _, margin = LOSSES[name]
        a, p, n, _, mask = make_tuples(4, 3, 8, dtype=dtype)
        out = fn(a.to(device), p.to(device), n.to(device), margin=margin, neg_mask=mask.to(device))
        assert out.shape == ()
        assert out.dtype == dtype
        assert out.device == a.to(device).device
        assert torch.isfinite(out)
        assert module()(a.to(device), p.to(device), n.to(device)).shape == ()

    @pytest.mark.parametrize("margin", [0.05, 0.3, 0.7, 1.5])
    def test_reference(self, name: str, margin: float) -> None:
        fn, _, ref, _ = LOSSES[name]
        a, p, n, garbage, mask = make_tuples(6, 5, 7, seed=1)
        # Padded slots hold NaN / inf: they must not reach the loss.
        out = fn(a, p, garbage, margin=margin, neg_mask=mask)
        expected = torch.tensor(ref(a, p, n, mask, margin), dtype=torch.float64)
        self.assert_close(out, expected)
        # Without a mask every slot is real.
        self.assert_close(fn(a, p, n, margin=margin), torch.tensor(ref(a, p, n, None, margin), dtype=torch.float64))
        self.assert_close(
            fn(a, p, n, margin=margin, neg_mask=torch.ones(6, 5, dtype=torch.bool)), fn(a, p, n, margin=margin)
        )

    def test_reference_float32(self, name: str) -> None:
        fn, _, ref, margin = LOSSES[name]
        a, p, n, garbage, mask = make_tuples(5, 4, 16, seed=2)
        out = fn(a.float(), p.float(), garbage.float(), margin=margin, neg_mask=mask)
        assert out.dtype == torch.float32
        self.assert_close(out, torch.tensor(ref(a, p, n, mask, margin), dtype=torch.float64))

    def test_empty_tuples(self, name: str) -> None:
        fn, module, _, margin = LOSSES[name]
        a = torch.zeros(0, 4, dtype=torch.float64, requires_grad=True)
        p = torch.zeros(0, 4, dtype=torch.float64, requires_grad=True)
        n = torch.zeros(0, 3, 4, dtype=torch.float64, requires_grad=True)
        out = fn(a, p, n, margin=margin, neg_mask=torch.zeros(0, 3, dtype=torch.bool))
        assert out.shape == ()
        assert out.item() == 0.0
        assert out.grad_fn is not None
        out.backward()
        assert a.grad is not None
        assert a.grad.shape == (0, 4)
        assert module()(a, p, n).item() == 0.0

    def test_no_negatives(self, name: str) -> None:
        fn, _, _, margin = LOSSES[name]
        a, p, _, _, _ = make_tuples(3, 1, 5, seed=3)
        n = torch.zeros(3, 0, 5, dtype=torch.float64)
        out = fn(a, p, n, margin=margin, neg_mask=torch.zeros(3, 0, dtype=torch.bool))
        if name == "contrastive":
            expected = 0.5 * (((a - p) ** 2).sum(dim=1) + 1e-12).mean()
        else:
            expected = torch.zeros((), dtype=torch.float64)
        self.assert_close(out, expected)

    def test_padding_gets_zero_gradient(self, name: str) -> None:
        fn = LOSSES[name][0]
        a, p, _, garbage, mask = make_tuples(4, 3, 5, seed=4)
        a.requires_grad_()
        garbage.requires_grad_()
        kwargs = {"eps": 0.0} if name == "contrastive" else {}
        fn(a, p, garbage, margin=1.5, neg_mask=mask, **kwargs).backward()
        assert torch.isfinite(a.grad).all()
        assert torch.equal(garbage.grad[~mask], torch.zeros_like(garbage.grad[~mask]))
        assert (garbage.grad[mask].abs().sum(dim=-1) > 0).any()

    def test_module_matches_functional(self, name: str) -> None:
        fn, module, _, _ = LOSSES[name]
        a, p, n, garbage, mask = make_tuples(5, 4, 6, seed=5)
        m = module(margin=0.9)
        self.assert_close(m(a, p, garbage, mask), fn(a, p, garbage, margin=0.9, neg_mask=mask))
        self.assert_close(m(a, p, n), fn(a, p, n, margin=0.9))
        assert list(m.parameters()) == []
        assert "margin=0.9" in repr(m)

    def test_gradcheck(self, name: str) -> None:
        fn, _, _, _ = LOSSES[name]
        margin = 1.4 if name == "contrastive" else 1.5  # some hinges active, some not
        a, p, n, _, mask = make_tuples(3, 4, 4, seed=6)
        # Away from the hinge kinks: no active/inactive boundary within the finite-difference step.
        dist_n = ((a[:, None] - n) ** 2).sum(-1)
        pos = ((a - p) ** 2).sum(-1)[:, None]
        hinge = margin - dist_n.sqrt() if name == "contrastive" else pos - dist_n + margin
        assert hinge.abs().min() > 1e-3
        assert (hinge > 0)[mask].any()
        assert (hinge < 0)[mask].any()
        inputs = tuple(t.clone().requires_grad_() for t in (a, p, n))
        assert self.gradcheck(lambda x, y, z: fn(x, y, z, margin=margin, neg_mask=mask), inputs)
        assert self.gradcheck(lambda x, y, z: fn(x, y, z, margin=margin), inputs)

    def test_compile(self, name: str) -> None:
        fn, module, _, margin = LOSSES[name]
        a, p, _, garbage, mask = make_tuples(4, 3, 6, seed=7, dtype=torch.float32)
        compiled = torch.compile(module(), backend="eager", fullgraph=True)
        self.assert_close(compiled(a, p, garbage, mask), fn(a, p, garbage, margin=margin, neg_mask=mask))

    def test_noncontiguous(self, name: str) -> None:
        fn, _, _, margin = LOSSES[name]
        a, p, n, _, mask = make_tuples(4, 3, 6, seed=8)
        nt = n.transpose(0, 1).contiguous().transpose(0, 1)
        at = a.T.contiguous().T
        assert not nt.is_contiguous()
        assert not at.is_contiguous()
        self.assert_close(fn(at, p, nt, margin=margin, neg_mask=mask), fn(a, p, n, margin=margin, neg_mask=mask))

    @pytest.mark.parametrize("dt", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
    def test_dtype_preserved(self, name: str, dt: torch.dtype) -> None:
        fn, module, _, margin = LOSSES[name]
        a, p, n, _, mask = make_tuples(4, 3, 6, seed=9)
        out = fn(a.to(dt), p.to(dt), n.to(dt), margin=margin, neg_mask=mask)
        assert out.dtype == dt
        assert module()(a.to(dt), p.to(dt), n.to(dt), mask).dtype == dt
        self.assert_close(out.double(), fn(a, p, n, margin=margin, neg_mask=mask), rtol=3e-2, atol=3e-2)


class TestLossSemantics(BaseTester):
    def test_contrastive_margin(self) -> None:
        a = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)
        p = a.clone()
        n = torch.tensor([[[0.0, 1.0, 0.0]]], dtype=torch.float64)  # at distance sqrt(2)
        # Identical anchor and positive: the positive term is eps / 2; a negative beyond the margin adds 0.
        assert F.contrastive_loss(a, p, n, margin=1.4, eps=0.0).item() == 0.0
        assert F.contrastive_loss(a, p, n, margin=0.7).item() == pytest.approx(0.5e-12, abs=1e-15)
        # Inside the margin: 0.5 * (margin - d)^2.
        out = F.contrastive_loss(a, p, n, margin=1.5, eps=0.0)
        self.assert_close(out, torch.tensor(0.5 * (1.5 - math.sqrt(2)) ** 2, dtype=torch.float64))
        # Positive at distance 0.6: 0.5 * 0.36.
        p2 = torch.tensor([[1.0, 0.6, 0.0]], dtype=torch.float64)
        self.assert_close(F.contrastive_loss(a, p2, n, margin=0.7, eps=0.0), torch.tensor(0.18, dtype=torch.float64))
        # The mean is over tuples, not over negatives.
        n3 = n.expand(1, 3, 3)
        self.assert_close(F.contrastive_loss(a, p, n3, margin=1.5, eps=0.0), 3 * out)

    def test_triplet_margin(self) -> None:
        a = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
        p = torch.tensor([[1.0, 0.3]], dtype=torch.float64)  # ||a - p||^2 = 0.09
        n = torch.tensor([[[1.0, 0.5], [1.0, 0.1]]], dtype=torch.float64)  # 0.25 and 0.01
        # 0.09 - 0.25 + 0.1 < 0 contributes 0; 0.09 - 0.01 + 0.1 = 0.18.
        self.assert_close(F.triplet_loss(a, p, n, margin=0.1), torch.tensor(0.18, dtype=torch.float64))
        self.assert_close(F.triplet_loss(a, p, n[:, :1], margin=0.1), torch.tensor(0.0, dtype=torch.float64))
        self.assert_close(F.triplet_loss(a, p, n[:, :1], margin=0.2), torch.tensor(0.04, dtype=torch.float64))
        self.assert_close(
            F.triplet_loss(a, p, n, margin=0.1, neg_mask=torch.tensor([[True, False]])),
            torch.tensor(0.0, dtype=torch.float64),
        )

    def test_mean_over_tuples(self) -> None:
        a, p, n, _, mask = make_tuples(6, 3, 5, seed=11)
        for fn in (F.contrastive_loss, F.triplet_loss):
            whole = fn(a, p, n, neg_mask=mask, margin=0.5)
            parts = torch.stack(
                [fn(a[i : i + 1], p[i : i + 1], n[i : i + 1], neg_mask=mask[i : i + 1], margin=0.5) for i in range(6)]
            )
            self.assert_close(whole, parts.mean())

    def test_module_repr(self) -> None:
        assert repr(deepagg.ContrastiveLoss()) == "ContrastiveLoss(margin=0.7, eps=1e-12)"
        assert repr(deepagg.TripletLoss(margin=0.25)) == "TripletLoss(margin=0.25)"
        assert deepagg.ContrastiveLoss(margin=1).margin == 1.0

    def test_exception(self) -> None:
        a, p, n, _, mask = make_tuples(3, 2, 4, seed=12)
        for fn in (F.contrastive_loss, F.triplet_loss):
            name = fn.__name__
            with pytest.raises(
                TypeError, match=rf"{name}\(\): anchor must be a torch.Tensor of shape \(T, D\); got list"
            ):
                fn([[0.0]], p, n)
            with pytest.raises(
                ShapeError,
                match=rf"{name}\(\): anchor must have shape \(T, D\); got \(4\) with 1 dims\. Pass one anchor desc",
            ):
                fn(a[0], p, n)
            with pytest.raises(
                ShapeError, match=rf"{name}\(\): positive must have shape \(T, D\) with T=3; got \(2, 4\)\. Pass one"
            ):
                fn(a, p[:2], n)
            with pytest.raises(
                ShapeError, match=rf"{name}\(\): positive must have shape \(T, D\) with D=4; got \(3, 5\)"
            ):
                fn(a, torch.zeros(3, 5, dtype=torch.float64), n)
            with pytest.raises(
                ShapeError,
                match=rf"{name}\(\): negatives must have shape \(T, K, D\); got \(3, 4\) with 2 dims\. Pass K neg",
            ):
                fn(a, p, n[:, 0])
            with pytest.raises(
                ShapeError, match=rf"{name}\(\): negatives must have shape \(T, K, D\) with T=3; got \(2, 2, 4\)"
            ):
                fn(a, p, n[:2])
            with pytest.raises(
                ShapeError, match=rf"{name}\(\): negatives must have shape \(T, K, D\) with D=4; got \(3, 2, 3\)"
            ):
                fn(a, p, n[..., :3])
            with pytest.raises(
                ShapeError, match=rf"{name}\(\): neg_mask must have shape \(T, K\) with K=2; got \(3, 3\)"
            ):
                fn(a, p, n, neg_mask=torch.ones(3, 3, dtype=torch.bool))
            with pytest.raises(
                ShapeError, match=rf"{name}\(\): neg_mask must have shape \(T, K\); got \(3\) with 1 dims"
            ):
                fn(a, p, n, neg_mask=mask[:, 0])
            with pytest.raises(
                DTypeError, match=rf"{name}\(\): neg_mask must have dtype in \[torch.bool\]; got torch.int64"
            ):
                fn(a, p, n, neg_mask=mask.long())
            with pytest.raises(
                DTypeError, match=rf"{name}\(\): anchor must be a floating-point tensor; got dtype torch.int64"
            ):
                fn(a.long(), p, n)
            with pytest.raises(DTypeError, match=rf"{name}\(\): negatives must be a floating-point tensor"):
                fn(a, p, n.long())
            with pytest.raises(
                DeviceError, match=rf"{name}\(\): negatives must be on the same device as anchor \(cpu\)"
            ):
                fn(a, p, n.to("meta"))
            with pytest.raises(DeviceError, match=rf"{name}\(\): neg_mask must be on the same device as anchor"):
                fn(a, p, n, neg_mask=mask.to("meta"))
            for bad in (0, -0.5, float("nan"), float("inf"), True):
                with pytest.raises(
                    ValueError, match=rf"{name}\(\): margin must be a finite number > 0; got {re.escape(repr(bad))}\."
                ):
                    fn(a, p, n, margin=bad)
            with pytest.raises(ValueError, match=rf"{name}\(\): margin must be a finite number > 0; got Tensor tensor"):
                fn(a, p, n, margin=torch.tensor(0.5))
        for bad in (-1e-3, float("nan"), "1e-6"):
            with pytest.raises(
                ValueError,
                match=rf"contrastive_loss\(\): eps must be a finite number >= 0; got {re.escape(repr(bad))}\.",
            ):
                F.contrastive_loss(a, p, n, eps=bad)
        with pytest.raises(ValueError, match=r"ContrastiveLoss\(\): margin must be a finite number > 0; got -0\.7\."):
            deepagg.ContrastiveLoss(margin=-0.7)
        with pytest.raises(ValueError, match=r"ContrastiveLoss\(\): eps must be a finite number >= 0; got -1\."):
            deepagg.ContrastiveLoss(eps=-1)
        with pytest.raises(ValueError, match=r"TripletLoss\(\): margin must be a finite number > 0; got 0\."):
            deepagg.TripletLoss(margin=0)
        with pytest.raises(ValueError, match=r"TripletLoss\(\): margin must be a finite number > 0; got str '0.1'\."):
            deepagg.TripletLoss(margin="0.1")
