"""The Triton scan's backward beyond test_triton_scan.py: gradients from bf16 inputs, and the
in-kernel reductions (group sums of dq/dk, bias gradients).

Interpreted on the CPU (TRITON_INTERPRET=1, set by conftest) at small shapes.
"""
import pytest
import torch

from hybridlm.kernels.mamba3 import oracle
from hybridlm.testing import rel_err, scan_kwargs
from test_reference import make_inputs
from test_triton_scan import DEVICE

triton_pkg = pytest.importorskip("hybridlm.kernels.mamba3.triton")
triton_scan = triton_pkg.mamba3_chunked


@pytest.mark.parametrize("narrow_state_grads", [0, 1])
def test_bfloat16_gradients(narrow_state_grads, monkeypatch):
    """bf16 inputs, MIMO R=4: dq, dk summed over a group's heads in fp32 and cast back, dv in bf16;
    every gradient within bf16 rounding of the fp32 reference (the interpreter multiplies in fp32).
    ``narrow_state_grads``: the backward's per-chunk state gradients stored in bf16, not fp32 (the knob)."""
    from hybridlm.kernels.mamba3.triton import chunk_bwd
    from hybridlm.kernels.mamba3.tuning import use_tuning

    stored = []
    real_states = chunk_bwd.chunk_states

    def spy(*a, **k):
        states, final = real_states(*a, **k)
        stored.append(states.dtype)
        return states, final

    monkeypatch.setattr(chunk_bwd, "chunk_states", spy)
    args, kw = make_inputs(B=1, L=40, R=4, H=2, N=16, P=16, S=4, layout="half")
    leaves_ref = [t.clone().requires_grad_() if t is not None else None for t in args]
    y_ref = oracle.mamba3_chunked(*leaves_ref, **scan_kwargs(kw))
    bf16 = [t.to(DEVICE).bfloat16().requires_grad_() for t in args[:3]] + [t.to(DEVICE) for t in args[3:]]
    kw16 = {n: v.to(DEVICE) if torch.is_tensor(v) else v for n, v in kw.items()}
    kw16["z"] = kw16["z"].bfloat16()
    with use_tuning(triton_narrow_state_grads=narrow_state_grads):
        y = triton_scan(*bf16, **scan_kwargs(kw16), chunk_size=16)
        w = torch.randn(y.shape, generator=torch.Generator().manual_seed(5)).to(y.device)
        grads = torch.autograd.grad((y.float() * w).sum(), bf16[:3])
    grads_ref = torch.autograd.grad((y_ref * w.cpu()).sum(), leaves_ref[:3])
    assert stored == [torch.bfloat16 if narrow_state_grads else torch.float32]
    assert all(g.dtype == torch.bfloat16 for g in grads)
    errors = {n: rel_err(g.float().cpu(), r) for n, g, r in zip("qkx", grads, grads_ref)}
    assert max(errors.values()) < 2e-2, errors


@pytest.mark.parametrize("R,H,G,has_bias,group_heads,bias_in_group_sums", [
    (1, 4, 1, True, None, 0), (4, 4, 2, True, None, 0), (2, 4, 4, True, None, 0), (1, 4, 2, False, None, 0),
    (1, 6, 1, False, None, 0),  # 6 heads a group, one load of 8 (N 24): two masked
    (2, 6, 2, False, 2, 0),  # 3 heads a group, 2 a load
    (1, 6, 1, True, 1, 0),  # head by head
    (1, 6, 2, True, 2, 1), (1, 4, 1, True, None, 1),  # the bias sums from the group sums' column sums
    (4, 4, 2, True, None, 1), (1, 4, 4, True, None, 1),  # ... which only SISO with groups takes
])
def test_head_sums_kernel_equals_the_torch_reductions(R, H, G, has_bias, group_heads, bias_in_group_sums,
                                                     monkeypatch):
    """The backward's reduction kernels: the group sums of per-head dq/dk (bf16, summed in fp32)
    and the bias gradients, against the torch reductions they replaced; a bias program sums one
    row block here (``triton_bias_rows`` lowered), so every head's gradient is added from several
    programs. ``group_heads``: heads a group-sum load takes (None: the default, 8 at N 24);
    ``bias_in_group_sums``: the knob that takes the bias gradients from the group sums' column sums."""
    from hybridlm.kernels.mamba3.triton import head_sums as module
    from hybridlm.kernels.mamba3.tuning import use_tuning

    if bias_in_group_sums and R == 1 and H != G:  # the folded path must not fall back to the bias kernel
        monkeypatch.setattr(module, "_bias_sums_kernel", None)
    head_sums = module.head_sums
    T, N = 37, 24  # N not a power of two; T·R not a multiple of the row block
    g = torch.Generator().manual_seed(3)
    dq_heads = torch.randn(T, R, H, N, generator=g).bfloat16().to(DEVICE)
    dk_heads = torch.randn(T, R, H, N, generator=g).bfloat16().to(DEVICE)
    with use_tuning(triton_bias_rows=1, triton_group_heads=group_heads,
                    triton_bias_in_group_sums=bias_in_group_sums):
        dq, dk, dq_bias, dk_bias = head_sums(dq_heads, dk_heads, G, has_bias)
    for per_head, total, bias in ((dq_heads, dq, dq_bias), (dk_heads, dk, dk_bias)):
        want = per_head.view(T, R, G, H // G, N).sum(3, dtype=torch.float32)
        assert total.dtype == torch.bfloat16 and total.shape == (T, R, G, N)
        # the fp32 sums cast once to bf16: within one bf16 ulp (the interpreter truncates, the GPU rounds)
        assert ((total.float() - want).abs() <= want.abs() * 2 ** -7 + 1e-6).all()
        if has_bias:
            torch.testing.assert_close(bias, per_head.sum(0, dtype=torch.float32).transpose(0, 1), rtol=1e-6,
                                       atol=1e-5)
        else:
            assert bias is None


def test_bias_rows_aim_at_about_a_thousand_programs():
    """The bias-sum programs' row count when no knob sets it: the faster of the two counts measured on the
    H200 at both measured shapes (SISO: 1024 rows, MIMO R = 4: 4096), clamped to [1024, 4096]."""
    from hybridlm.kernels.mamba3.triton.head_sums import bias_rows_for

    assert bias_rows_for(8 * 2048, 32) == 1024  # SISO, B 8, L 2K, 32 heads
    assert bias_rows_for(8 * 2048 * 4, 32) == 4096  # MIMO R = 4, same shape
    assert bias_rows_for(16 * 2048, 24) == 2048  # hybrid-small's training step: 768 programs
    assert bias_rows_for(37, 4) == 1024 and bias_rows_for(10**8, 64) == 4096


@pytest.mark.parametrize("through", ["output", "final_state"])
def test_gradients_through_one_output(through):
    """A loss on the output alone or on the final state alone: the chunk op's backward gets no gradient for
    the other outputs (autograd does not fill them with zeros, ``core._setup_context``) and must still match
    the reference in every input's gradient."""
    args, kw = make_inputs(B=2, L=40, R=1, H=2, N=16, P=8, S=4)
    leaves = [t.clone().to(DEVICE).requires_grad_() for t in args]
    leaves_ref = [t.clone().requires_grad_() for t in args]
    kw_dev = {n: v.to(DEVICE) if torch.is_tensor(v) else v for n, v in kw.items()}
    y, final = triton_scan(*leaves, **scan_kwargs(kw_dev), chunk_size=16, return_final_state=True)
    y_ref, final_ref = oracle.mamba3_chunked(*leaves_ref, **scan_kwargs(kw), chunk_size=16, return_final_state=True)
    w = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(5))
    w_ssm = torch.randn(final_ref.ssm.shape, generator=torch.Generator().manual_seed(6))
    loss = (y * w.to(DEVICE)).sum() if through == "output" else (final.ssm * w_ssm.to(DEVICE)).sum()
    loss_ref = (y_ref * w).sum() if through == "output" else (final_ref.ssm * w_ssm).sum()
    grads = torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)
    grads_ref = torch.autograd.grad(loss_ref, leaves_ref, allow_unused=True, materialize_grads=True)
    names = ("q", "k", "x", "dt", "adt", "lam", "rate")
    errors = {n: rel_err(g.cpu(), r) for n, g, r in zip(names, grads, grads_ref) if r.abs().max() > 0}
    assert len(errors) >= 6 and max(errors.values()) < 1e-4, errors  # q has no part in the final state
    assert all(g.abs().max() == 0 for g, r in zip(grads, grads_ref) if r.abs().max() == 0)
