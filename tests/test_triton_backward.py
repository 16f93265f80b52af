"""The Triton scan's two backward designs (KernelTuning.triton_backward) against the reference, and
the in-kernel reductions (group sums of dq/dk, bias gradients, dD).

Interpreted on the CPU (TRITON_INTERPRET=1, set by conftest) at small shapes; tolerances as
test_triton_scan.py (fp32, norm-wise relative: forward 1e-5, gradients 1e-4). Every gradient is
checked, including the bias gradients, the initial state's and (through the loss) the final state's.
"""
import pytest
import torch

from hybridlm.kernels.mamba3 import oracle
from hybridlm.kernels.mamba3.tuning import KernelTuning, tuning_from_env, use_tuning
from hybridlm.testing import rel_err, scan_kwargs
from test_reference import _angles, make_inputs, random_state
from test_triton_scan import DEVICE, assert_same, run_with_grads

triton_pkg = pytest.importorskip("hybridlm.kernels.mamba3.triton")
triton_scan = triton_pkg.mamba3_chunked

@pytest.fixture
def reverse_calls(monkeypatch):
    """(design, chunk tokens) of every reverse-design launch, so a test knows the knob reached the
    backward."""
    from hybridlm.kernels.mamba3.triton import chunk_bwd

    calls = []
    for design, name in (("reverse", "reverse_backward"), ("reverse-blocked", "reverse_blocked_backward")):
        def counted(*args, _design=design, _original=getattr(chunk_bwd, name), **kwargs):
            calls.append((_design, args[0].reverse_chunk))
            return _original(*args, **kwargs)

        monkeypatch.setattr(chunk_bwd, name, counted)
    return calls


REVERSE_CASES = {
    # name: (design, B, R, G, H, N, P, rope_fraction, layout, out_norm, backward chunk tokens); 37 tokens
    # heads of a group add into one dq/dk (atomics); 2 backward chunks of 2 forward chunks each
    "reverse-siso-G1": ("reverse", 2, 1, 1, 4, 16, 8, 0.5, "interleaved", "none", 32),
    # one head per group (plain stores), three chunks of one forward chunk each
    "reverse-siso-G=H": ("reverse", 1, 1, 2, 2, 16, 8, 1.0, "interleaved", "pregate_grouped", 16),
    # d_state 64: 32 rotation pairs held at once
    "reverse-siso-N64": ("reverse", 1, 1, 1, 2, 64, 8, 0.5, "interleaved", "none", 32),
    # MIMO: 16 tokens × 4 ranks, the largest tile with fp32 products (bf16: test_reverse_bfloat16_gradients)
    "reverse-mimo4": ("reverse", 1, 4, 1, 2, 16, 8, 1.0, "half", "none", 16),
    # d_state 64 in two pair blocks, the state gradient double-buffered across three chunks
    "blocked-siso-N64": ("reverse-blocked", 1, 1, 1, 2, 64, 8, 0.5, "interleaved", "none", 16),
    "blocked-mimo2-G2": ("reverse-blocked", 2, 2, 2, 4, 16, 8, 0.5, "half", "postgate_grouped", 32),
    "blocked-siso-G=H": ("reverse-blocked", 1, 1, 2, 2, 16, 8, 1.0, "interleaved", "none", 32),
}


@pytest.mark.parametrize("case", list(REVERSE_CASES))
def test_reverse_backward_matches_reference(case, reverse_calls):
    design, B, R, G, H, N, P, frac, layout, out_norm, chunk = REVERSE_CASES[case]
    S = _angles(N, frac)
    args, kw = make_inputs(B=B, L=37, R=R, G=G, H=H, N=N, P=P, S=S, layout=layout, out_norm=out_norm)
    init = random_state(B, H, P, N, S, R)
    with use_tuning(triton_backward=design, triton_backward_chunk=chunk):
        ours = run_with_grads(triton_scan, args, kw, init)
    assert reverse_calls == [(design, chunk)]
    assert_same(ours, run_with_grads(oracle.mamba3_chunked, args, kw, init))


@pytest.mark.parametrize("config", [("reverse-blocked", 1, 2, 4, "interleaved"), ("reverse", 2, 1, 2, "half")])
def test_reverse_backward_packed_ragged_sequences(config, reverse_calls):
    """Packed ragged sequences (one empty, one of a single token), initial states, groups; forward
    chunks of 8 tokens, backward chunks of 16."""
    design, R, G, H, layout = config
    N, P, S = 16, 8, 4
    lengths = [13, 0, 21, 1, 9]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    args, kw = make_inputs(B=1, L=sum(lengths), R=R, G=G, H=H, N=N, P=P, S=S, layout=layout)
    init = random_state(len(lengths), H, P, N, S, R)
    with use_tuning(triton_backward=design, triton_backward_chunk=16):
        ours = run_with_grads(triton_scan, args, kw, init, cu_seqlens=cu, chunk_size=8)
    assert reverse_calls == [(design, 16)]
    assert_same(ours, run_with_grads(oracle.mamba3_chunked, args, kw, init, cu_seqlens=cu, chunk_size=8))


@pytest.mark.parametrize("design", ["reverse", "reverse-blocked"])
def test_reverse_without_biases_d_or_rotation(design, reverse_calls):
    """No B/C biases, no D, no rotation: the flags that drop the in-kernel sums."""
    args, kw = make_inputs(B=1, L=20, G=2, S=0, lam=0.5)
    kw.update(q_bias=None, k_bias=None, D=None)
    with use_tuning(triton_backward=design, triton_backward_chunk=16):
        ours = run_with_grads(triton_scan, args, kw)
    assert reverse_calls == [(design, 16)]
    assert_same(ours, run_with_grads(oracle.mamba3_chunked, args, kw))


@pytest.mark.parametrize("design", ["reverse", "reverse-blocked"])
def test_reverse_bfloat16_gradients(design, reverse_calls):
    """bf16 inputs, MIMO R=4: dq, dk summed over a group's heads in fp32 and cast back, dv in bf16;
    every gradient within bf16 rounding of the fp32 reference (the interpreter multiplies in fp32)."""
    args, kw = make_inputs(B=1, L=40, R=4, H=2, N=16, P=16, S=4, layout="half")
    leaves_ref = [t.clone().requires_grad_() if t is not None else None for t in args]
    y_ref = oracle.mamba3_chunked(*leaves_ref, **scan_kwargs(kw))
    bf16 = [t.to(DEVICE).bfloat16().requires_grad_() for t in args[:3]] + [t.to(DEVICE) for t in args[3:]]
    kw16 = {n: v.to(DEVICE) if torch.is_tensor(v) else v for n, v in kw.items()}
    kw16["z"] = kw16["z"].bfloat16()
    with use_tuning(triton_backward=design, triton_backward_chunk=32):
        y = triton_scan(*bf16, **scan_kwargs(kw16), chunk_size=16)
        w = torch.randn(y.shape, generator=torch.Generator().manual_seed(5)).to(y.device)
        grads = torch.autograd.grad((y.float() * w).sum(), bf16[:3])
    grads_ref = torch.autograd.grad((y_ref * w.cpu()).sum(), leaves_ref[:3])
    # 32 tokens × 4 ranks: the largest tile with bf16 products, two 16-token forward chunks
    assert reverse_calls == [(design, 32)] and all(g.dtype == torch.bfloat16 for g in grads)
    errors = {n: rel_err(g.float().cpu(), r) for n, g, r in zip("qkx", grads, grads_ref)}
    assert max(errors.values()) < 2e-2, errors


def test_reverse_chunk_is_whole_forward_chunks_within_the_row_cap():
    from hybridlm.kernels.mamba3.triton.layout import dense_layout
    from hybridlm.kernels.mamba3.triton.spec import MAX_REVERSE_ROWS, ScanSpec

    def reverse_chunk(rank, forward_chunk, knob, dtype=torch.bfloat16):
        return ScanSpec(layout=dense_layout(1, 64, forward_chunk, torch.device(DEVICE)), rank=rank, n_groups=1,
                        n_heads=2, d_state=16, headdim=8, n_angles=4, interleaved=True, matmul_dtype=dtype,
                        tuning=KernelTuning(triton_backward_chunk=knob)).reverse_chunk

    assert MAX_REVERSE_ROWS == 128
    assert reverse_chunk(1, 64, 64) == 64 and reverse_chunk(1, 16, 32) == 32
    assert reverse_chunk(4, 16, 64) == 32 and reverse_chunk(8, 8, 64) == 16  # 128 rows at most
    assert reverse_chunk(4, 16, 64, torch.float32) == 16  # 64 rows with fp32 products
    assert reverse_chunk(1, 64, 16) == 64 and reverse_chunk(1, 64, 64, torch.float32) == 64  # ≥ the forward's


@pytest.mark.parametrize("R,G,has_bias", [(1, 1, True), (4, 2, True), (2, 4, True), (1, 2, False)])
def test_head_sums_kernel_equals_the_torch_reductions(R, G, has_bias):
    """The chunk-parallel design's one reduction kernel: the group sums of per-head dq/dk (bf16,
    summed in fp32) and the bias gradients, against the torch reductions it replaced."""
    from hybridlm.kernels.mamba3.triton.head_sums import head_sums

    T, H, N = 37, 4, 24  # N not a power of two; T·R not a multiple of the row block
    g = torch.Generator().manual_seed(3)
    dq_heads = torch.randn(T, R, H, N, generator=g).bfloat16().to(DEVICE)
    dk_heads = torch.randn(T, R, H, N, generator=g).bfloat16().to(DEVICE)
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


@pytest.mark.parametrize("design", ["reverse", "reverse-blocked"])
def test_opcheck_of_the_backward_op_under_the_reverse_designs(design, reverse_calls):
    """The backward op's schema and fake implementation hold for the reverse designs' outputs too
    (fp32 head sums cast to q's dtype, in-kernel bias and dD sums)."""
    from test_triton_compile import recorded_op_args

    op_args, op_kwargs = recorded_op_args()["mamba3_chunk_bwd"]
    op_args = [a.detach().clone() if torch.is_tensor(a) else a for a in op_args]
    with use_tuning(triton_backward=design):
        torch.library.opcheck(torch.ops.hybridlm.mamba3_chunk_bwd.default, op_args, op_kwargs,
                              test_utils=("test_schema", "test_faketensor"))
    assert reverse_calls and all(d == design for d, _ in reverse_calls)


def test_backward_knobs_from_the_environment():
    tuned = tuning_from_env({"HYBRIDLM_TRITON_BACKWARD": "reverse", "HYBRIDLM_TRITON_BACKWARD_CHUNK": "32",
                             "HYBRIDLM_TRITON_REVERSE_WARPS": "4"})
    assert (tuned.triton_backward, tuned.triton_backward_chunk, tuned.triton_reverse_warps) == ("reverse", 32, 4)
    assert KernelTuning().triton_backward == "chunk-parallel"  # the default until the GPU measures
    with pytest.raises(ValueError, match="HYBRIDLM_TRITON_BACKWARD"):
        tuning_from_env({"HYBRIDLM_TRITON_BACKWARD": "backwards"})
    with pytest.raises(ValueError, match="triton_backward_chunk must be a power of two"):
        KernelTuning(triton_backward_chunk=48)
    with pytest.raises(ValueError, match="triton_backward must be one of"):
        KernelTuning(triton_backward="fast")
