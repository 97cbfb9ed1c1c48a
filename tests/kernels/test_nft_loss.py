import pytest
import torch

from firm.kernels import nft_loss, nft_loss_reference
from firm.kernels.nft_loss import STAT_KEYS
from tests.kernels.utils import assert_fused_close, gpu, interpreter

SHAPES = [(1, 1), (1, 7), (3, 5, 7, 11), (2, 3, 17, 29)]


def _inputs(shape, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    b = shape[0]
    x0, noise, v_theta = (torch.randn(*shape, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.rand(b, generator=g, dtype=torch.float64) * 0.9 + 0.05
    tb = t.reshape(-1, *[1] * (len(shape) - 1))
    x_t = (1 - tb) * x0 + tb * noise
    v_old = v_theta + 0.1 * torch.randn(*shape, generator=g, dtype=torch.float64)
    v_ref = v_theta + 0.2 * torch.randn(*shape, generator=g, dtype=torch.float64)
    r = torch.rand(b, generator=g, dtype=torch.float64)
    out = dict(v_theta=v_theta, v_old=v_old, v_ref=v_ref, x_t=x_t, x0=x0, t=t, r=r)
    return {k: x.to(device=device, dtype=dtype) for k, x in out.items()}


def _run(fn, inp, has_ref, **kw):
    v_ref = inp["v_ref"] if has_ref else None

    def f(vt):
        loss, stats = fn(vt, inp["v_old"], v_ref, inp["x_t"], inp["x0"], inp["t"], inp["r"], **kw)
        return loss, stats

    vt = inp["v_theta"].detach().clone().requires_grad_(True)
    loss, stats = f(vt)
    (g,) = torch.autograd.grad(loss, vt)
    return loss.detach(), stats, g


def _check(shape, has_ref, dtype, device, beta=1.0):
    kw = dict(beta=beta, adv_clip_max=5.0, kl_beta=0.3)
    inp = _inputs(shape, dtype, device)
    loss, stats, g = _run(nft_loss, inp, has_ref, **kw)
    inp64 = {k: v.double() for k, v in inp.items()}
    loss64, stats64, g64 = _run(nft_loss_reference, inp64, has_ref, compute_dtype=torch.float64, **kw)
    loss_p, stats_p, g_p = _run(nft_loss_reference, inp, has_ref, compute_dtype=dtype, **kw)
    assert loss.shape == () and loss.dtype == torch.float32
    assert set(stats) == set(STAT_KEYS)
    assert_fused_close("loss", loss, loss_p, loss64, dtype)
    for key in STAT_KEYS:
        assert stats[key].shape == (shape[0],) and stats[key].dtype == torch.float32 and not stats[key].requires_grad
        assert_fused_close(key, stats[key], stats_p[key], stats64[key], dtype)
    assert g.dtype == dtype and g.shape == shape
    assert_fused_close("grad v_theta", g, g_p, g64, dtype)


@pytest.mark.parametrize("beta", [1.0, 0.3])
@pytest.mark.parametrize("has_ref", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_default_path_matches_float64(shape, has_ref, beta):
    _check(shape, has_ref, torch.float32, "cpu", beta)


@interpreter
@pytest.mark.parametrize("beta", [1.0, 0.3])
@pytest.mark.parametrize("has_ref", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_interpreter_matches_float64(shape, has_ref, beta):
    _check(shape, has_ref, torch.float32, "cpu", beta)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [*SHAPES, (4, 16, 64, 64), (1, 16, 128, 128)])
def test_gpu_matches_float64(shape, dtype):
    _check(shape, True, dtype, "cuda", 1.0)


def test_formula_by_hand():
    # one sample, D = 2, beta = 1: v+ = v_theta, v- = 2 v_old - v_theta
    vt = torch.tensor([[1.0, -1.0]], requires_grad=True)
    vo, vr = torch.tensor([[0.5, 0.0]]), torch.tensor([[0.0, 0.0]])
    x_t, x0 = torch.tensor([[1.0, 1.0]]), torch.tensor([[0.0, 0.0]])
    t, r = torch.tensor([0.5]), torch.tensor([0.25])
    loss, st = nft_loss(vt, vo, vr, x_t, x0, t, r, beta=1.0, adv_clip_max=5.0, kl_beta=0.1)
    e_pos = [1 - 0.5 * 1.0, 1 - 0.5 * -1.0]  # [0.5, 1.5]
    e_neg = [1 - 0.5 * 0.0, 1 - 0.5 * 1.0]  # v- = [0, 1] -> [1.0, 0.5]
    w_pos, w_neg = 1.0, 0.75
    l_pos = (0.25 + 2.25) / 2 / w_pos
    l_neg = (1.0 + 0.25) / 2 / w_neg
    policy = (0.25 * l_pos + 0.75 * l_neg) * 5.0
    kl = (1 + 1) / 2
    assert st["w_pos"].item() == pytest.approx(w_pos) and st["w_neg"].item() == pytest.approx(w_neg)
    assert st["policy"].item() == pytest.approx(policy) and st["kl"].item() == pytest.approx(kl)
    assert loss.item() == pytest.approx(policy + 0.1 * kl)
    loss.backward()
    # d/dv = -(2 t acm / D)(r e+/w+ - (1-r) e-/w-) + kl_beta 2 (vt - vr) / D ; weights are constants
    grad = [
        -(2 * 0.5 * 5.0 / 2) * (0.25 * ep / w_pos - 0.75 * en / w_neg) + 0.1 * 2 * v / 2
        for ep, en, v in zip(e_pos, e_neg, [1.0, -1.0])
    ]
    torch.testing.assert_close(vt.grad, torch.tensor([grad]))


def test_weights_floor():
    # perfect x0-prediction -> mean|e| = 0 -> the weights are floored at 1e-5, loss stays finite
    x0 = torch.zeros(1, 4)
    vt = torch.zeros(1, 4, requires_grad=True)
    loss, st = nft_loss(vt, torch.zeros(1, 4), None, x0, x0, torch.tensor([0.5]), torch.tensor([1.0]))
    assert st["w_pos"].item() == pytest.approx(1e-5) and loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(vt.grad).all()


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(v_old=torch.zeros(2, 5)), "shape of `v_theta`"),
        (dict(t=torch.ones(3)), "one value per sample"),
        (dict(x0=torch.zeros(2, 4, requires_grad=True)), "`x0` requires grad"),
        (dict(v_ref=torch.zeros(2, 4, device="meta")), "one device"),
        (dict(beta=0.0), "beta must be > 0"),
        (dict(kl_beta=-1.0), "kl_beta must be >= 0"),
        (dict(r=torch.ones(2, dtype=torch.int64)), "float16/bfloat16/float32/float64"),
    ],
)
def test_validation(change, message):
    z = torch.zeros(2, 4)
    args = dict(v_theta=z, v_old=z, v_ref=z, x_t=z, x0=z, t=torch.ones(2), r=torch.ones(2))
    args.update(change)
    kw = {k: args.pop(k) for k in ("beta", "kl_beta") if k in args}
    with pytest.raises((ValueError, TypeError), match=message):
        nft_loss(*args.values(), **kw)


def _compiled(vt, vo, vr, x_t, x0, t, r):
    loss, stats = nft_loss(vt, vo, vr, x_t, x0, t, r, kl_beta=0.1)
    return loss, stats["policy"]


def _check_compile():
    inp = _inputs((2, 3, 5))
    args = list(inp.values())
    explain = torch._dynamo.explain(_compiled)(*args)
    assert explain.graph_break_count == 0, explain.break_reasons
    vt = args[0].clone().requires_grad_(True)
    rest = [args[1], args[1], *args[3:]]  # v_ref aliases v_old
    out = torch.compile(_compiled, backend="aot_eager", fullgraph=True)(vt, *rest)
    (g,) = torch.autograd.grad(out[0], vt)
    vt2 = args[0].clone().requires_grad_(True)
    out2 = _compiled(vt2, *rest)
    (g2,) = torch.autograd.grad(out2[0], vt2)
    torch.testing.assert_close(out, out2)
    torch.testing.assert_close(g, g2)
    torch._dynamo.reset()


def test_torch_compile_default_path_no_graph_break():
    _check_compile()


@interpreter
def test_torch_compile_triton_path_no_graph_break():
    _check_compile()


@interpreter
def test_triton_path_is_used_and_forced_reference(monkeypatch):
    inp = _inputs((2, 3))
    vt = inp.pop("v_theta").requires_grad_(True)
    loss, stats = nft_loss(vt, *inp.values())
    assert any("firm_kernels" in type(fn).__name__ for fn in _graph(loss.grad_fn))
    monkeypatch.setenv("FIRM_KERNELS", "torch")
    loss_t, _ = nft_loss(vt, *inp.values())
    assert not any("firm_kernels" in type(fn).__name__ for fn in _graph(loss_t.grad_fn))
    torch.testing.assert_close(loss, loss_t)


def _graph(fn, seen=None):
    seen = set() if seen is None else seen
    if fn is None or fn in seen:
        return seen
    seen.add(fn)
    for nxt, _ in fn.next_functions:
        _graph(nxt, seen)
    return seen


@interpreter
def test_opcheck_custom_ops():
    inp = _inputs((2, 3, 5))
    vt = inp["v_theta"].requires_grad_(True)
    args = (vt, inp["v_old"], inp["v_ref"], inp["x_t"], inp["x0"], inp["t"], inp["r"], 0.7, 5.0)
    torch.library.opcheck(torch.ops.firm_kernels.nft_loss.default, args)
    stats = torch.ops.firm_kernels.nft_loss(*[a.detach() if torch.is_tensor(a) else a for a in args])
    bwd = (*[a.detach() for a in args[:7]], stats, torch.ones(6, 2), 0.7, 5.0)
    torch.library.opcheck(torch.ops.firm_kernels.nft_loss_backward.default, bwd)
