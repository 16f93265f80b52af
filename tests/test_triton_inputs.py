"""The scan's per-token inputs in one Triton kernel each way (B/C RMSNorm, Δ, A·Δ, λ) against the
reference (:func:`hybridlm.kernels.mamba3.oracle.mamba3_inputs`, plain torch and its autograd).

Interpreted on the CPU (TRITON_INTERPRET=1, set by conftest) at small shapes. Inputs are views of
one wider in_proj row, as the module passes them, with values past every branch: Δ's softplus
threshold (20) and deep negative tail, A's floor, heavy_tail's kink at 0.
"""
import warnings

import pytest
import torch

from hybridlm.kernels import dispatch
from hybridlm.kernels.mamba3 import oracle
from hybridlm.testing import rel_err

triton_inputs = pytest.importorskip("hybridlm.kernels.mamba3.triton.inputs")


def make_segments(T: int, R: int, G: int, N: int, H: int, trap: bool, dtype: torch.dtype, seed: int = 0):
    """b, c, dd_dt, dd_a, trap as column views of one (2, T/2, width) projection; dt_bias; the norm weights."""
    g = torch.Generator().manual_seed(seed)
    W = R * G * N
    width = 2 * W + (3 if trap else 2) * H + 5  # 5 columns no segment reads
    proj = torch.randn(2, T // 2, width, generator=g)
    dd_dt = proj[..., 2 * W: 2 * W + H]
    dd_dt.mul_(8.0)  # past both softplus branches once dt_bias is added
    dd_dt[0, 0, 0], dd_dt[0, 1, 0] = 30.0, -40.0
    dd_a = proj[..., 2 * W + H: 2 * W + 2 * H]
    dd_a.mul_(3.0)
    dd_a[0, 2, :] = 0.0  # heavy_tail's kink
    proj = proj.to(dtype)
    split = [W, W, H, H] + ([H] if trap else []) + [5]
    segments = list(torch.split(proj, split, dim=-1))[:-1]
    dt_bias = torch.randn(H, generator=g) - 3.0
    b_norm = (1 + 0.3 * torch.randn(N, generator=g)).to(dtype)
    c_norm = (1 + 0.3 * torch.randn(N, generator=g)).to(dtype)
    if not trap:
        segments.append(None)
    return proj, segments, dt_bias, b_norm, c_norm


def run(fn, proj, segments, dt_bias, b_norm, c_norm, grads_seed: int, **kw):
    """fn's outputs and the gradients of a random weighting of them w.r.t. proj and the parameters."""
    leaves = [t.detach().clone().requires_grad_() for t in (proj, dt_bias, b_norm, c_norm)]
    p = leaves[0]
    cols = [s.shape[-1] if s is not None else 0 for s in segments]
    views = list(torch.split(p, cols + [p.shape[-1] - sum(cols)], dim=-1))[:len(segments)]
    views = [v if s is not None else None for v, s in zip(views, segments)]
    outs = fn(*views, leaves[1], leaves[2], leaves[3], **kw)
    g = torch.Generator().manual_seed(grads_seed)
    loss = sum((o.float() * torch.randn(o.shape, generator=g)).sum() for o in outs)
    return outs, torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("R,G,N,H,trap,activation,discretization", [
    (1, 1, 16, 4, True, "heavy_tail", "trapezoid"),
    (4, 1, 8, 6, True, "softplus", "trapezoid"),  # MIMO, H not a power of two
    (2, 2, 12, 4, False, "heavy_tail", "euler"),  # N not a power of two, two groups
    (1, 2, 8, 4, False, "softplus", "half"),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inputs_kernels_match_the_reference(R, G, N, H, trap, activation, discretization, dtype):
    """Forward outputs and every gradient (the projection's columns, dt_bias, both norm weights)
    against the reference's autograd, norm-wise. fp32: outputs 2e-7, gradients 1e-6 (measured ≤ 7e-8
    and ≤ 4e-7: sums in another order, rsqrt, exp and log rounded differently); bf16: q, k within one
    bf16 ulp of the reference's, gradients of bf16 tensors 6e-3 (measured ≤ 4.4e-3: each cast once
    from fp32, which the interpreter truncates where torch rounds), dt_bias's (fp32) 1e-6."""
    T = 70  # not a multiple of any token block
    proj, segments, dt_bias, b_norm, c_norm = make_segments(T, R, G, N, H, trap, dtype)
    kw = dict(rank=R, a_activation=activation, A_floor=0.05, discretization=discretization, b_eps=1e-5, c_eps=2e-5)
    ref_out, ref_grads = run(oracle.mamba3_inputs, proj, segments, dt_bias, b_norm, c_norm, 1, **kw)
    out, grads = run(triton_inputs.mamba3_inputs, proj, segments, dt_bias, b_norm, c_norm, 1, **kw)
    for name, o, r in zip(("q", "k", "dt", "adt", "lam"), out, ref_out):
        assert o.dtype == r.dtype and o.shape == r.shape, name
        if dtype == torch.bfloat16 and name in "qk":  # one bf16 ulp (the interpreter truncates, the GPU rounds)
            assert ((o.float() - r.float()).abs() <= r.float().abs() * 2 ** -7 + 1e-6).all(), name
        else:
            assert rel_err(o, r) < 2e-7, (name, rel_err(o, r))
    for name, gr, r in zip(("proj", "dt_bias", "b_norm", "c_norm"), grads, ref_grads):
        assert gr.dtype == r.dtype, name
        bound = 1e-6 if dtype == torch.float32 or name == "dt_bias" else 6e-3
        assert rel_err(gr, r) < bound, (name, rel_err(gr, r))


def test_floor_and_thresholds_pass_gradients_as_torch():
    """Element by element where the branches switch: A at its floor, dt past 20, heavy_tail at 0."""
    T, H = 6, 4
    proj, segments, dt_bias, b_norm, c_norm = make_segments(T, 1, 1, 4, H, True, torch.float32, seed=2)
    dd_a = segments[3]
    dd_a[0, 0, :] = torch.tensor([0.0, -1.0, 2.0, -18.0])  # heavy_tail: 1, 0.5, 3, 1/19 ≈ 0.053
    dd_a[0, 1, :] = torch.tensor([-19.0, -100.0, 25.0, -0.5])  # 0.05 exactly at the floor (passes), below it
    kw = dict(rank=1, a_activation="heavy_tail", A_floor=0.05, discretization="trapezoid", b_eps=1e-5, c_eps=1e-5)
    ref_out, ref_grads = run(oracle.mamba3_inputs, proj, segments, dt_bias, b_norm, c_norm, 3, **kw)
    out, grads = run(triton_inputs.mamba3_inputs, proj, segments, dt_bias, b_norm, c_norm, 3, **kw)
    W = 4
    a_cols = slice(2 * W + H, 2 * W + 2 * H)
    torch.testing.assert_close(out[3], ref_out[3], rtol=1e-6, atol=0)
    torch.testing.assert_close(grads[0][..., a_cols], ref_grads[0][..., a_cols], rtol=1e-5, atol=1e-7)
    assert (ref_grads[0][0, 1, a_cols][1] == 0) and (grads[0][0, 1, a_cols][1] == 0)  # below the floor


def test_dispatch_picks_the_kernel_and_falls_back_for_float64():
    proj, segments, dt_bias, b_norm, c_norm = make_segments(8, 1, 1, 8, 2, True, torch.float64)
    kw = dict(rank=1, a_activation="heavy_tail", A_floor=1e-4, discretization="trapezoid", b_eps=1e-5, c_eps=1e-5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = dispatch.mamba3_inputs(*segments, dt_bias.double(), b_norm, c_norm, backend="triton", **kw)
    assert any("float64" in str(w.message) for w in caught)
    ref = oracle.mamba3_inputs(*segments, dt_bias.double(), b_norm, c_norm, **kw)
    assert all(torch.equal(o, r) for o, r in zip(out, ref))


def test_opcheck_schema_fake_and_autograd_registration():
    """Both ops' schemas, fake implementations and the forward's autograd registration
    (``torch.library.opcheck``; under torch.compile dynamo sees them as opaque calls)."""
    proj, segments, dt_bias, b_norm, c_norm = make_segments(10, 2, 1, 8, 4, True, torch.bfloat16)
    leaves = [s.detach().clone().requires_grad_() for s in segments] + [
        t.detach().clone().requires_grad_() for t in (dt_bias, b_norm, c_norm)]
    scalars = (2, 1e-5, 1e-5, 1e-4, True, 0.5)
    torch.library.opcheck(torch.ops.hybridlm.mamba3_inputs_fwd.default, (*leaves, *scalars))
    k, q, dt, adt, lam = torch.ops.hybridlm.mamba3_inputs_fwd(*leaves, *scalars)
    grads = [torch.randn(t.shape).to(t.dtype) for t in (k, q, dt, adt, lam)]
    detached = [t.detach() for t in leaves]
    torch.library.opcheck(torch.ops.hybridlm.mamba3_inputs_bwd.default, (*detached, *grads, *scalars))


def test_compiled_module_matches_eager():
    """A Mamba-3 layer on the Triton backend under torch.compile (fullgraph, aot_eager): no graph
    break at the inputs op, outputs and gradients equal eager's."""
    from hybridlm.blocks.mamba3 import Mamba3

    torch._dynamo.reset()
    layer = Mamba3(32, d_state=8, headdim=8, is_mimo=True, mimo_rank=2, backend="triton")
    u = torch.randn(1, 12, 32)

    def loss(fn):
        layer.zero_grad()
        x = u.clone().requires_grad_()
        y = fn(x)
        (y * torch.linspace(-1, 1, y.numel()).view(y.shape)).sum().backward()
        return [y.detach(), x.grad] + [p.grad for p in layer.parameters()]

    eager = loss(layer)
    compiled = loss(torch.compile(layer, backend="aot_eager", fullgraph=True))
    torch._dynamo.reset()
    for a, b in zip(compiled, eager):
        assert rel_err(a, b) < 1e-6
