"""The Triton Mamba-3 scan against the reference: forward, every gradient, states, packing.

On a machine without CUDA the kernels run under TRITON_INTERPRET=1 (set by conftest), so the
shapes stay tiny. Tolerances (fp32, norm-wise relative): forward 1e-5, gradients 1e-4.
"""
import warnings

import pytest
import torch

from hybridlm.kernels import dispatch
from hybridlm.kernels.mamba3 import oracle
from hybridlm.kernels.mamba3.contract import Mamba3State
from hybridlm.testing import rel_err, scan_kwargs
from test_reference import _angles, make_inputs, random_state

triton_scan = pytest.importorskip("hybridlm.kernels.mamba3.triton").mamba3_chunked

FWD_TOL = 1e-5
GRAD_TOL = 1e-4
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INPUT_NAMES = ("q", "k", "x", "dt", "adt", "lam", "angle_rate")

CONFIGS = {
    # name: (R, G, H, N, P, rope_fraction, layout, out_norm)
    "siso": (1, 1, 4, 16, 8, 0.5, "interleaved", "none"),
    "siso-groups-rope1-norm": (1, 2, 4, 16, 8, 1.0, "interleaved", "pregate_grouped"),
    "mimo2-groups": (2, 2, 4, 16, 8, 0.5, "half", "postgate_grouped"),
    "mimo4-rope1": (4, 1, 2, 16, 8, 1.0, "half", "pregate_default"),  # a norm across heads: the torch path
    # MIMO weights at rank 1 (a Mamba3 block built with is_mimo=True, mimo_rank=1): x, z and y still
    # weighted per rank (the Triton path once skipped x's weights below rank 2)
    "mimo1-weights": (1, 1, 2, 16, 8, 0.5, "half", "pregate_grouped"),
    # d_state 64: the kernels walk N in several blocks of rotation pairs
    "siso-N64": (1, 1, 2, 64, 8, 0.5, "interleaved", "none"),
    "mimo2-N64": (2, 1, 2, 64, 8, 1.0, "half", "pregate_grouped"),
    # 8 rotated pairs of 32: the first pair block half rotated (angle 0 past S), the second one
    # taken by the kernels' unrotated loop (rows.rotated_end)
    "siso-N64-rope-quarter": (1, 1, 2, 64, 8, 0.25, "interleaved", "none"),
    "mimo2-N64-rope-quarter": (2, 1, 2, 64, 8, 0.25, "half", "none"),
}


def to_device(t):
    return t.to(DEVICE) if torch.is_tensor(t) else t


def run_with_grads(fn, args, kw, init=None, cu_seqlens=None, chunk_size=16):
    """Output, final state and the gradient of a random projection of both w.r.t. every input."""
    leaves = {n: to_device(t).clone().requires_grad_() for n, t in zip(INPUT_NAMES, args) if t is not None}
    inputs = [leaves.get(n) for n in INPUT_NAMES]
    kwl = {n: to_device(v).clone().requires_grad_() if torch.is_tensor(v) else v for n, v in kw.items()}
    leaves.update({n: v for n, v in kwl.items() if torch.is_tensor(v)})
    state = None
    if init is not None:
        state = Mamba3State(*(to_device(t).clone().requires_grad_() for t in init))
        leaves.update({f"initial_{f}": t for f, t in zip(Mamba3State._fields, state)})
    y, final = fn(*inputs, **scan_kwargs(kwl), initial_state=state, return_final_state=True, chunk_size=chunk_size,
                  cu_seqlens=None if cu_seqlens is None else to_device(cu_seqlens))
    gen = torch.Generator().manual_seed(7)
    loss = sum((t * torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t)).sum() for t in (y, *final))
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    return y, final, dict(zip(leaves, grads))


def assert_same(ours, ref):
    y, final, grads = ours
    y_ref, final_ref, grads_ref = ref
    errors = {"output": rel_err(y, y_ref)}
    errors.update({f"final {n}": rel_err(a, b) for n, a, b in zip(Mamba3State._fields, final, final_ref)})
    bad = {k: v for k, v in errors.items() if v > FWD_TOL}
    for name, g_ref in grads_ref.items():
        if g_ref is None:
            assert grads[name] is None, name
            continue
        err = rel_err(grads[name], g_ref)
        if err > GRAD_TOL:
            bad[f"d {name}"] = err
    assert not bad, f"relative errors over tolerance: {bad}"


@pytest.mark.parametrize("config", list(CONFIGS))
def test_matches_reference_with_states_and_gradients(config):
    R, G, H, N, P, frac, layout, out_norm = CONFIGS[config]
    S = _angles(N, frac)
    args, kw = make_inputs(B=2, L=37, R=R, G=G, H=H, N=N, P=P, S=S, layout=layout, out_norm=out_norm)
    init = random_state(2, H, P, N, S, R)
    assert_same(run_with_grads(triton_scan, args, kw, init),
                run_with_grads(oracle.mamba3_chunked, args, kw, init))


@pytest.mark.parametrize("config", ["siso", "mimo2-groups"])
def test_packed_ragged_sequences(config):
    """Packed sequences of ragged lengths (one empty, one of a single token) with initial states."""
    R, G, H, N, P, frac, layout, out_norm = CONFIGS[config]
    S = _angles(N, frac)
    lengths = [13, 0, 21, 1, 9]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    args, kw = make_inputs(B=1, L=sum(lengths), R=R, G=G, H=H, N=N, P=P, S=S, layout=layout, out_norm=out_norm)
    init = random_state(len(lengths), H, P, N, S, R)
    assert_same(run_with_grads(triton_scan, args, kw, init, cu_seqlens=cu, chunk_size=8),
                run_with_grads(oracle.mamba3_chunked, args, kw, init, cu_seqlens=cu, chunk_size=8))


@pytest.mark.parametrize("variant", ["euler-no-rotation", "half-no-bias-no-D", "no-gate"])
def test_spec_switches_are_inputs(variant):
    """Euler/half λ, rotation off, biases off, D off, no z: the same kernels, other inputs."""
    args, kw = make_inputs(B=2, L=20, S=0 if variant == "euler-no-rotation" else 4,
                           lam=1.0 if variant == "euler-no-rotation" else (0.5 if "half" in variant else None),
                           with_z=variant != "no-gate")
    if variant == "half-no-bias-no-D":
        kw.update(q_bias=None, k_bias=None, D=None)
    assert_same(run_with_grads(triton_scan, args, kw), run_with_grads(oracle.mamba3_chunked, args, kw))


def test_tuning_knobs_reach_the_spec_and_keep_the_results():
    """The knobs come from one KernelTuning (not the environment at every call): a launch under
    use_tuning takes them as constexprs and launch options (which Triton compiles per value), and
    smaller pair blocks (4 blocks over d_state 64) give the same results."""
    from hybridlm.kernels.mamba3.triton.layout import dense_layout
    from hybridlm.kernels.mamba3.triton.spec import ScanSpec
    from hybridlm.kernels.mamba3.tuning import KernelTuning, use_tuning

    def launch_values(**tuning):
        spec = ScanSpec(layout=dense_layout(1, 16, 16, torch.device(DEVICE)), rank=1, n_groups=1, n_heads=2,
                        d_state=64, headdim=8, n_angles=16, interleaved=True, matmul_dtype=torch.float32, **tuning)
        return (spec.constexprs()["BLOCK_PAIRS"], spec.parallel_warps, spec.backward_warps, spec.backward_stages)

    R, G, H, N, P, frac, layout, out_norm = CONFIGS["siso-N64"]
    args, kw = make_inputs(B=1, L=21, R=R, G=G, H=H, N=N, P=P, S=_angles(N, frac), layout=layout,
                           out_norm=out_norm)
    default = launch_values()
    with use_tuning(triton_block_pairs=8, triton_warps=2, triton_backward_stages=2):
        assert launch_values() == (8, 2, 2, 2) != default
        ours = run_with_grads(triton_scan, args, kw)
    assert launch_values() == default  # the tuning in force before comes back
    assert launch_values(tuning=KernelTuning(triton_block_pairs=4))[0] == 4  # a spec may pin its own
    assert_same(ours, run_with_grads(oracle.mamba3_chunked, args, kw))


@pytest.mark.parametrize("knobs", [dict(triton_states_split_p=2, triton_states_block_pairs=8),
                                   dict(triton_states_split_p=4, triton_states_stages=1),
                                   dict(triton_states_maxnreg=255)])
def test_states_kernel_knobs_keep_the_results(knobs):
    """The states kernel's own tiling (issue 17's A/B): a head's P rows split over programs, other
    pair blocks than the chunk kernels', other stages and register caps, over packed ragged sequences
    (3, 1 and 2 chunks) with initial states and a quarter of the pairs rotated (a pair block of 8 is
    then wholly rotated or wholly not, so both walks, rotated and not, run)."""
    from hybridlm.kernels.mamba3.tuning import use_tuning

    lengths = [19, 1, 12]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    N, P, H = 64, 64, 2  # headdim 64: up to four P blocks of 16
    S = _angles(N, 0.25)
    args, kw = make_inputs(B=1, L=sum(lengths), R=1, G=1, H=H, N=N, P=P, S=S, layout="interleaved")
    init = random_state(len(lengths), H, P, N, S, 1)
    with use_tuning(**knobs):
        ours = run_with_grads(triton_scan, args, kw, init, cu_seqlens=cu, chunk_size=8)
    assert_same(ours, run_with_grads(oracle.mamba3_chunked, args, kw, init, cu_seqlens=cu, chunk_size=8))


@pytest.mark.parametrize("config", ["mimo2-groups", "mimo2-N64"])
@pytest.mark.parametrize("knobs", [dict(triton_output_block_t=16, triton_output_warps=2),
                                   dict(triton_output_block_t=128, triton_output_warps=8)])
def test_output_kernel_tiling_keeps_the_results(config, knobs):
    """The output-stage and rank-expansion kernels' token blocks and warps (issue 17's MIMO A/B): blocks
    smaller and larger than the 37 tokens (a partial last block, or one block for all), with both grouped
    norms, against the oracle, forward and every gradient (the per-block partial sums of d mimo_z, d mimo_o
    and d norm weight included, now written without a zero fill)."""
    from hybridlm.kernels.mamba3.tuning import tuning_from_env, use_tuning

    R, G, H, N, P, frac, layout, out_norm = CONFIGS[config]
    args, kw = make_inputs(B=1, L=37, R=R, G=G, H=H, N=N, P=P, S=_angles(N, frac), layout=layout,
                           out_norm=out_norm)
    with use_tuning(**knobs):
        ours = run_with_grads(triton_scan, args, kw)
    assert_same(ours, run_with_grads(oracle.mamba3_chunked, args, kw))
    env = tuning_from_env({"HYBRIDLM_TRITON_OUTPUT_BLOCK_T": "64", "HYBRIDLM_TRITON_OUTPUT_WARPS": "8"})
    assert (env.triton_output_block_t, env.triton_output_warps) == (64, 8)
    with pytest.raises(ValueError, match="triton_output_block_t must be a power of two"):
        use_tuning(triton_output_block_t=48).__enter__()


@pytest.mark.parametrize("rank,out_norm,gated", [(2, "pregate_grouped", True), (4, "postgate_grouped", True),
                                                 (4, "none", False)])
def test_output_and_expansion_backwards_match_the_oracle(rank, out_norm, gated):
    """The gate/norm/rank-contraction backward and the rank-expansion backward (which loads every rank's rows
    before its first store) called directly, against the oracle's autograd within fp32 rounding: MIMO R = 2 and
    4, both grouped norms and none, with and without the gate, 37 tokens over blocks of 16 (a partial last
    block)."""
    from hybridlm.kernels.mamba3.shared import expand_ranks, mamba3_output
    from hybridlm.kernels.mamba3.triton import output, ranks
    from hybridlm.kernels.mamba3.tuning import use_tuning

    gen = torch.Generator().manual_seed(rank)
    T, H, P = 37, 3, 8
    x = torch.randn(T, H, P, generator=gen)
    mimo_x, mimo_z, mimo_o = (torch.randn(H, rank, P, generator=gen) for _ in range(3))
    z, mimo_z = (torch.randn(T, H, P, generator=gen), mimo_z) if gated else (None, None)
    norm_weight = torch.rand(H * P, generator=gen) + 0.5 if out_norm != "none" else None
    dout = torch.randn(T, H, P, generator=gen)
    y = expand_ranks(x, mimo_x, rank) + 0.1 * torch.randn(T, rank, H, P, generator=gen)
    with use_tuning(triton_output_block_t=16):
        got = output.gated_output_bwd(y, z, mimo_z, mimo_o, norm_weight, dout, out_norm, 1e-5)
        got = [g for g in got if g.numel()] + list(ranks.expand_ranks_bwd(got[0], x, mimo_x))
    given = dict(y=y, z=z, mimo_z=mimo_z, mimo_o=mimo_o, norm_weight=norm_weight)  # the kernel's gradient order
    leaves = {name: t.clone().requires_grad_() for name, t in given.items() if t is not None}
    out = mamba3_output(leaves["y"], leaves.get("z"), mimo_z=leaves.get("mimo_z"), mimo_o=leaves["mimo_o"],
                        norm_weight=leaves.get("norm_weight"), out_norm=out_norm, norm_eps=1e-5)
    want = list(torch.autograd.grad(out, list(leaves.values()), dout))
    lx, lmx = x.clone().requires_grad_(), mimo_x.clone().requires_grad_()
    want += list(torch.autograd.grad(expand_ranks(lx, lmx, rank), (lx, lmx), got[0]))
    assert len(got) == len(want)
    assert all(rel_err(a, b) <= 1e-5 for a, b in zip(got, want)), [rel_err(a, b) for a, b in zip(got, want)]


@pytest.mark.parametrize("config,kernels", [("mimo2-groups", 1), ("mimo2-N64", 2), ("mimo4-rope1", 1)])
def test_fused_rank_expansion_keeps_the_results(config, kernels, monkeypatch):
    """triton_fuse_ranks: MIMO's x expanded to the ranks inside the states, output and backward chunk kernels
    (no v (T, R, H, P) written; dx and d mimo_x from the backward chunk kernel), fused and split backward
    designs, over packed ragged sequences with initial states (the empty slots of the packed layout write no
    d mimo_x share): against the oracle, the output and every gradient, d mimo_x among them; and no
    expansion kernel launched."""
    from hybridlm.kernels.mamba3.triton import ranks
    from hybridlm.kernels.mamba3.tuning import use_tuning

    launched = []
    for name in ("_expand_fwd_kernel", "_expand_bwd_kernel"):
        monkeypatch.setattr(ranks, name, _LaunchSpy(getattr(ranks, name), launched))

    R, G, H, N, P, frac, layout, out_norm = CONFIGS[config]
    lengths = [19, 1, 12]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    S = _angles(N, frac)
    args, kw = make_inputs(B=1, L=sum(lengths), R=R, G=G, H=H, N=N, P=P, S=S, layout=layout, out_norm=out_norm)
    assert kw.get("mimo_x") is not None
    init = random_state(len(lengths), H, P, N, S, R)
    with use_tuning(triton_fuse_ranks=1, triton_backward_kernels=kernels):
        ours = run_with_grads(triton_scan, args, kw, init, cu_seqlens=cu, chunk_size=8)
    assert launched == []
    assert_same(ours, run_with_grads(oracle.mamba3_chunked, args, kw, init, cu_seqlens=cu, chunk_size=8))
    run_with_grads(triton_scan, args, kw, init, cu_seqlens=cu, chunk_size=8)  # the default: the expansion kernels
    assert launched == ["_expand_fwd_kernel", "_expand_bwd_kernel"]


def test_backward_kernels_knob_is_checked_and_read_from_the_environment():
    from hybridlm.kernels.mamba3.triton.layout import dense_layout
    from hybridlm.kernels.mamba3.triton.spec import ScanSpec
    from hybridlm.kernels.mamba3.tuning import KernelTuning, tuning_from_env, use_tuning

    assert KernelTuning().triton_backward_kernels == 1  # the fused kernel until the split one is measured
    assert tuning_from_env({"HYBRIDLM_TRITON_BACKWARD_KERNELS": "2"}).triton_backward_kernels == 2
    with pytest.raises(ValueError, match="triton_backward_kernels must be 1 .* or 2"):
        tuning_from_env({"HYBRIDLM_TRITON_BACKWARD_KERNELS": "3"})
    with pytest.raises(ValueError, match="HYBRIDLM_TRITON_BACKWARD_KERNELS"):
        tuning_from_env({"HYBRIDLM_TRITON_BACKWARD_KERNELS": "split"})
    for bad in (0, True, 2.0):
        with pytest.raises(ValueError, match="triton_backward_kernels"):
            KernelTuning(triton_backward_kernels=bad)
    spec = ScanSpec(layout=dense_layout(1, 16, 16, torch.device(DEVICE)), rank=1, n_groups=1, n_heads=2, d_state=16,
                    headdim=8, n_angles=4, interleaved=True, matmul_dtype=torch.float32)
    with use_tuning(triton_backward_kernels=2):
        assert spec.backward_kernels == 2
    assert spec.backward_kernels == 1


def test_states_knobs_are_checked_and_read_from_the_environment():
    from hybridlm.kernels.mamba3.tuning import KernelTuning, tuning_from_env

    env = {"HYBRIDLM_TRITON_STATES_MAXNREG": "128", "HYBRIDLM_TRITON_STATES_SPLIT_P": "2",
           "HYBRIDLM_TRITON_STATES_STAGES": "3"}
    t = tuning_from_env(env)
    assert (t.triton_states_maxnreg, t.triton_states_split_p, t.triton_states_stages) == (128, 2, 3)
    assert KernelTuning().triton_states_maxnreg is None and KernelTuning().triton_states_stages is None
    for bad in (dict(triton_states_split_p=3), dict(triton_states_maxnreg=0), dict(triton_states_stages=True)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            KernelTuning(**bad)


class _LaunchSpy:
    """Stands in for a Triton kernel: records its name at every launch, then launches it."""

    def __init__(self, kernel, launched):
        self.kernel, self.launched = kernel, launched

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launched.append(self.kernel.__name__)
            return self.kernel[grid](*args, **kwargs)
        return launch


def split_backward_case(case):
    """(args, kw, initial state, cu_seqlens, chunk size) of one split-backward test case."""
    if case == "siso-packed":  # ragged lengths (one empty, one of a single token), initial states
        R, G, H, N, P, frac, layout, out_norm = CONFIGS["siso"]
        lengths = [13, 0, 21, 1, 9]
        cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
        S = _angles(N, frac)
        args, kw = make_inputs(B=1, L=sum(lengths), R=R, G=G, H=H, N=N, P=P, S=S, layout=layout, out_norm=out_norm)
        return args, kw, random_state(len(lengths), H, P, N, S, R), cu, 8
    if case == "half-no-bias-no-D":
        args, kw = make_inputs(B=2, L=20, S=4, lam=0.5)
        kw.update(q_bias=None, k_bias=None, D=None)
        return args, kw, None, None, 16
    R, G, H, N, P, frac, layout, out_norm = CONFIGS[case]
    S = _angles(N, frac)
    args, kw = make_inputs(B=2, L=37, R=R, G=G, H=H, N=N, P=P, S=S, layout=layout, out_norm=out_norm)
    return args, kw, random_state(2, H, P, N, S, R), None, 16


# three cases keep the default run under its budget; tests/gpu runs both designs over every config
@pytest.mark.parametrize("case", ["mimo4-rope1", "siso-packed", "half-no-bias-no-D"])
def test_split_backward_matches_reference_and_fused(case, monkeypatch):
    """The split backward design (triton_backward_kernels=2: a dv kernel, then a dq/dk kernel)
    against the reference, and against the fused kernel: the same formulas, so the gradients agree
    to fp32 rounding (only the order of some sums differs) and the forward is the same."""
    from hybridlm.kernels.mamba3.triton import chunk_bwd
    from hybridlm.kernels.mamba3.tuning import use_tuning

    launched = []
    for name in ("_chunk_bwd_kernel", "_chunk_bwd_dv_kernel", "_chunk_bwd_dqk_kernel"):
        monkeypatch.setattr(chunk_bwd, name, _LaunchSpy(getattr(chunk_bwd, name), launched))
    args, kw, init, cu, chunk = split_backward_case(case)
    with use_tuning(triton_backward_kernels=2):
        split = run_with_grads(triton_scan, args, kw, init, cu_seqlens=cu, chunk_size=chunk)
    assert launched == ["_chunk_bwd_dv_kernel", "_chunk_bwd_dqk_kernel"]
    fused = run_with_grads(triton_scan, args, kw, init, cu_seqlens=cu, chunk_size=chunk)
    assert launched[2:] == ["_chunk_bwd_kernel"]
    assert_same(split, run_with_grads(oracle.mamba3_chunked, args, kw, init, cu_seqlens=cu, chunk_size=chunk))
    assert torch.equal(split[0], fused[0])
    off = {n: rel_err(g, fused[2][n]) for n, g in split[2].items() if g is not None and rel_err(g, fused[2][n]) > 1e-6}
    assert not off, f"split vs fused gradients beyond fp32 rounding: {off}"


def test_bfloat16_inputs_accumulate_in_fp32():
    """bf16 inputs: the state accumulates in fp32, so the error stays at bf16 rounding."""
    args, kw = make_inputs(B=1, L=40, H=2, N=16, P=16, S=4)
    y_ref = oracle.mamba3_chunked(*args, **scan_kwargs(kw))
    bf16 = [None if t is None else to_device(t).bfloat16() for t in args]
    kw16 = {n: to_device(v) for n, v in kw.items()}
    kw16["z"] = kw16["z"].bfloat16()
    y = triton_scan(*bf16, **scan_kwargs(kw16), chunk_size=16)
    assert y.dtype == torch.bfloat16
    assert rel_err(y.cpu(), y_ref) < 2e-2


def test_unsupported_input_falls_back_with_one_warning(monkeypatch):
    from hybridlm.kernels import registry

    monkeypatch.setattr(registry, "_warned", set())  # once per process: forget earlier fallbacks
    args, kw = make_inputs(B=1, L=6, H=2, N=8, P=4, S=2, dtype=torch.float64)
    args = tuple(to_device(t) for t in args)
    kw = {n: to_device(v) for n, v in kw.items()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = triton_scan(*args, **scan_kwargs(kw))
        triton_scan(*args, **scan_kwargs(kw))
    messages = [str(w.message) for w in caught if "falling back" in str(w.message)]
    assert len(messages) == 1 and "float64" in messages[0], messages
    assert rel_err(y, oracle.mamba3_chunked(*args, **scan_kwargs(kw))) == 0


def test_dispatch_picks_triton_on_cuda_and_reference_on_cpu(monkeypatch):
    from hybridlm.kernels import registry

    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    q, x = ((1, 1, 1, 1, 16), torch.float32), ((1, 1, 2, 16), torch.float32)  # the scan's plain support-check values

    def choose(backend, device_type):
        return registry.choose("mamba3", "scan", backend, device_type, None, q, x, None)

    assert choose(None, "cpu") == "reference"
    assert choose(None, "cuda") == "triton"  # the CuTe backend has no scan of its own: Triton's
    assert choose("reference", "cuda") == "reference"
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    assert choose(None, "cpu") == "triton"  # the interpreter (conftest)
    assert "triton" in registry.backend_names("mamba3")


def test_module_through_triton_matches_reference():
    """A whole Mamba-3 block (MIMO, pre-gate norm, randomized parameters), forward and every
    parameter gradient, with backend='triton' against backend='reference'."""
    from hybridlm.blocks import Mamba3
    from hybridlm.testing import randomize_mamba3_

    torch.manual_seed(0)
    block = Mamba3(d_model=32, d_state=16, headdim=16, ngroups=2, is_mimo=True, mimo_rank=2, chunk_size=8,
                   out_norm="pregate_grouped", device=DEVICE)
    randomize_mamba3_(block, seed=3)
    u = torch.randn(2, 19, 32, device=DEVICE)

    def run(backend):
        block.zero_grad()
        block.backend = backend
        out = block(u)
        out.square().sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in block.named_parameters()}

    out, grads = run("triton")
    out_ref, grads_ref = run("reference")
    assert rel_err(out, out_ref) <= FWD_TOL
    bad = {n: rel_err(g, grads_ref[n]) for n, g in grads.items() if rel_err(g, grads_ref[n]) > GRAD_TOL}
    assert not bad, bad
