import math

import pytest
import torch

from firm.kernels import SurrogateOutput, clipped_surrogate, clipped_surrogate_reference
from tests.kernels.utils import assert_fused_close, grad_of


@pytest.mark.parametrize("b", [1, 7, 64])
@pytest.mark.parametrize("clip_range", [1e-4, 0.2])
def test_matches_float64(b, clip_range):
    g = torch.Generator().manual_seed(b)
    lp = torch.randn(b, generator=g) * 0.3 - 5
    old = lp + torch.randn(b, generator=g) * 0.01
    adv = torch.randn(b, generator=g)

    def loss_only(fn, **kw):
        return lambda x: fn(x, old.to(x.dtype), adv.to(x.dtype), clip_range, **kw).loss

    (out,), grad = grad_of(loss_only(clipped_surrogate), lp)
    (ref,), grad64 = grad_of(loss_only(clipped_surrogate_reference, compute_dtype=torch.float64), lp.double())
    (plain,), grad_p = grad_of(loss_only(clipped_surrogate_reference), lp)
    assert_fused_close("loss", out, plain, ref, torch.float32)
    assert_fused_close("grad", grad, grad_p, grad64, torch.float32)


def test_by_hand():
    lp = torch.tensor([0.0, 0.0, 0.0, math.log(1.5)], requires_grad=True)
    old = torch.tensor([0.0, math.log(2.0), 0.0, 0.0])
    adv = torch.tensor([1.0, 1.0, -2.0, 1.0])
    out = clipped_surrogate(lp, old, adv, 0.2)
    assert isinstance(out, SurrogateOutput)
    loss, clip_frac, approx_kl = out
    # ratios 1, 0.5, 1, 1.5: the clipped branch is taken where it is larger (pessimistic)
    torch.testing.assert_close(loss, torch.tensor([-1.0, -0.5, 2.0, -1.2]))
    assert clip_frac.item() == pytest.approx(0.5)
    assert approx_kl.item() == pytest.approx(0.5 * (math.log(2.0) ** 2 + math.log(1.5) ** 2) / 4)
    assert not clip_frac.requires_grad and not approx_kl.requires_grad
    loss.sum().backward()
    # sample 3 is clipped: no gradient; others: -A * ratio
    torch.testing.assert_close(lp.grad, torch.tensor([-1.0, -0.5, 2.0, 0.0]))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(old_log_prob=torch.zeros(3)), r"must be \(B,\)"),
        (dict(advantages=torch.zeros(2, requires_grad=True)), "`advantages` requires grad"),
        (dict(clip_range=0.0), "clip_range must be > 0"),
        (dict(log_prob=torch.zeros(2, 1)), r"must be \(B,\)"),
    ],
)
def test_validation(kwargs, message):
    args = dict(log_prob=torch.zeros(2), old_log_prob=torch.zeros(2), advantages=torch.zeros(2), clip_range=0.1)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        clipped_surrogate(**args)
