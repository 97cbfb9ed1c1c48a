import math

import pytest
import torch

from firm.kernels import step_log_prob, step_log_prob_reference
from tests.kernels.utils import assert_fused_close, gpu, grad_of, interpreter

# Odd sizes: B=1, D=1, D not a multiple of the block (128 in the interpreter, 1024 on GPU), rows split into chunks.
SHAPES = [(1, 1), (1, 7), (3, 5, 7, 11), (2, 3, 17, 29)]


def _inputs(shape, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    b = shape[0]

    def rnd(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64)

    x, v, vr = rnd(*shape), rnd(*shape), rnd(*shape)
    cx = 1 + 0.05 * rnd(b)
    cv = -0.1 + 0.01 * rnd(b)
    std = 0.2 + torch.rand(b, generator=g, dtype=torch.float64)
    xp = cx.reshape(-1, *[1] * (len(shape) - 1)) * x + 0.3 * rnd(*shape)
    tensors = {"sample": x, "velocity": v, "prev_sample": xp, "coef_x": cx, "coef_v": cv, "std": std, "ref": vr}
    return {k: t.to(device=device, dtype=dtype) for k, t in tensors.items()}


def _run(fn, inp, has_ref, **kw):
    ref = inp["ref"] if has_ref else None

    def f(v):
        coefs = inp["coef_x"], inp["coef_v"], inp["std"]
        return fn(inp["sample"], v, inp["prev_sample"], *coefs, ref_velocity=ref, **kw)

    return grad_of(f, inp["velocity"])


def _check(shape, has_ref, dtype, device):
    inp = _inputs(shape, dtype, device)
    (lp, *sq), g = _run(step_log_prob, inp, has_ref)
    inp64 = {k: v.double() for k, v in inp.items()}
    (lp64, *sq64), g64 = _run(step_log_prob_reference, inp64, has_ref, compute_dtype=torch.float64)
    (lpp, *sqp), gp = _run(step_log_prob_reference, inp, has_ref, compute_dtype=dtype)  # plain torch in `dtype`
    assert lp.dtype == torch.float32 and lp.shape == (shape[0],)
    assert_fused_close("log_prob", lp, lpp, lp64, dtype)
    if has_ref:
        assert sq[0].dtype == torch.float32
        assert_fused_close("sq_dist", sq[0], sqp[0], sq64[0], dtype)
    else:
        assert not sq
    assert g.dtype == dtype and g.shape == shape
    assert_fused_close("grad velocity", g, gp, g64, dtype)


@pytest.mark.parametrize("has_ref", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_default_path_matches_float64(shape, has_ref):
    _check(shape, has_ref, torch.float32, "cpu")


@interpreter
@pytest.mark.parametrize("has_ref", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_interpreter_matches_float64(shape, has_ref):
    _check(shape, has_ref, torch.float32, "cpu")


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [*SHAPES, (4, 16, 64, 64), (1, 16, 128, 128)])
def test_gpu_matches_float64(shape, dtype):
    _check(shape, True, dtype, "cuda")


def test_formula_by_hand():
    # One sample, two elements: mu = 2*x + 0.5*v; residuals (prev - mu) = (0.5, -1.0); std 0.5.
    x = torch.tensor([[1.0, 2.0]])
    v = torch.tensor([[2.0, 0.0]], requires_grad=True)
    prev = torch.tensor([[3.5, 3.0]])
    lp, sq = step_log_prob(x, v, prev, torch.tensor([2.0]), torch.tensor([0.5]), torch.tensor([0.5]))
    expected = (-(0.25 + 1.0) / (2 * 0.25)) / 2 - math.log(0.5) - 0.5 * math.log(2 * math.pi)
    assert sq is None
    assert lp.item() == pytest.approx(expected, rel=1e-6)
    lp.sum().backward()
    # d/dv = coef_v * (prev - mu) / (std^2 D)
    torch.testing.assert_close(v.grad, torch.tensor([[0.5 * 0.5 / 0.25 / 2, 0.5 * -1.0 / 0.25 / 2]]))


def test_non_contiguous_and_mixed_dtypes():
    inp = _inputs((2, 6, 5))
    x_t = inp["sample"].transpose(1, 2).contiguous().transpose(1, 2)  # same values, non-contiguous
    assert not x_t.is_contiguous()
    lp, sq = step_log_prob(
        x_t,
        inp["velocity"].half(),
        inp["prev_sample"],
        inp["coef_x"],
        inp["coef_v"].reshape(2, 1, 1),
        inp["std"],
        ref_velocity=inp["ref"].bfloat16(),
    )
    lp_ref, sq_ref = step_log_prob_reference(
        inp["sample"],
        inp["velocity"].half(),
        inp["prev_sample"],
        inp["coef_x"],
        inp["coef_v"],
        inp["std"],
        inp["ref"].bfloat16(),
    )
    torch.testing.assert_close(lp, lp_ref)
    torch.testing.assert_close(sq, sq_ref)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(velocity=torch.zeros(2, 3)), "shape of `sample`"),
        (dict(std=torch.ones(3)), "one value per sample"),
        (dict(coef_x=torch.ones(2, dtype=torch.int64)), "float16/bfloat16/float32/float64"),
        (dict(sample=torch.zeros(2, 4, requires_grad=True)), "`sample` requires grad"),
        (dict(ref_velocity=torch.zeros(2, 4, device="meta")), "one device"),
        (dict(sample=torch.zeros(0, 4)), "B >= 1"),
        (dict(prev_sample=[1.0]), "must be a torch.Tensor"),
    ],
)
def test_validation(change, message):
    args = dict(
        sample=torch.zeros(2, 4),
        velocity=torch.zeros(2, 4),
        prev_sample=torch.zeros(2, 4),
        coef_x=torch.ones(2),
        coef_v=torch.ones(2),
        std=torch.ones(2),
        ref_velocity=None,
    )
    args.update(change)
    if args["sample"].shape[0] == 0:
        args.update(velocity=args["sample"], prev_sample=args["sample"])
    with pytest.raises((ValueError, TypeError), match=message):
        step_log_prob(**args)


def _compiled_loss(x, v, xp, cx, cv, s, vr):
    lp, sq = step_log_prob(x, v, xp, cx, cv, s, ref_velocity=vr)
    return (lp + 0.1 * sq).mean()


def _check_compile():
    inp = _inputs((2, 3, 5))
    args = [inp[k] for k in ("sample", "velocity", "prev_sample", "coef_x", "coef_v", "std")] + [inp["sample"]]
    explain = torch._dynamo.explain(_compiled_loss)(*args)
    assert explain.graph_break_count == 0, explain.break_reasons
    v = args[1].clone().requires_grad_(True)
    compiled = torch.compile(_compiled_loss, backend="aot_eager", fullgraph=True)
    out = compiled(args[0], v, *args[2:])  # ref_velocity aliases sample: must not break the graph either
    (g,) = torch.autograd.grad(out, v)
    v2 = args[1].clone().requires_grad_(True)
    out2 = _compiled_loss(args[0], v2, *args[2:])
    (g2,) = torch.autograd.grad(out2, v2)
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
    v = inp["velocity"].requires_grad_(True)
    args = (inp["sample"], v, inp["prev_sample"], inp["coef_x"], inp["coef_v"], inp["std"])
    assert "firm_kernels" in type(step_log_prob(*args)[0].grad_fn).__name__
    monkeypatch.setenv("FIRM_KERNELS", "torch")
    assert "firm_kernels" not in type(step_log_prob(*args)[0].grad_fn).__name__


@interpreter
def test_opcheck_custom_ops():
    inp = _inputs((2, 3, 5))
    v = inp["velocity"].requires_grad_(True)
    args = (inp["sample"], v, inp["prev_sample"], inp["ref"], inp["coef_x"], inp["coef_v"], inp["std"])
    torch.library.opcheck(torch.ops.firm_kernels.step_log_prob.default, args)
    grads = (torch.ones(2), torch.ones(2))
    bwd_args = tuple(a.detach() for a in args) + grads
    torch.library.opcheck(torch.ops.firm_kernels.step_log_prob_backward.default, bwd_args)
