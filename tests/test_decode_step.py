"""The decode step of a whole Mamba-3 layer (in_proj output -> out_proj input, state in place).

The reference decode step is checked against the module's unfused step path; the Triton kernel
(under TRITON_INTERPRET=1 on CPU) against the reference. fp32, norm-wise relative tolerance 1e-5
for the output and every state tensor.
"""
import math
import warnings

from pathlib import Path

import pytest
import torch

from hybridlm.blocks import Mamba3
from hybridlm.kernels import dispatch
from hybridlm.kernels.mamba3 import oracle
from hybridlm.kernels.mamba3.contract import DecodeLayout, Mamba3State
from hybridlm.kernels.mamba3.tuning import KernelTuning, tuning_from_env, use_tuning
from hybridlm.testing import random_decode_state, randomize_mamba3_, rel_err

TOL = 1e-5
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
triton_kernels = pytest.importorskip("hybridlm.kernels.mamba3.triton")

# name: Mamba3 constructor arguments (d_model 32 unless given)
LAYERS = {
    "siso": dict(d_state=16, headdim=8),
    "siso-groups-norm": dict(d_state=16, headdim=8, ngroups=2, is_outproj_norm=True),
    "siso-rope1-P12": dict(d_state=16, headdim=12, d_model=24, rope_fraction=1.0),
    "mimo2-groups-norm": dict(d_state=16, headdim=8, is_mimo=True, mimo_rank=2, ngroups=2, is_outproj_norm=True),
    "mimo4": dict(d_state=32, headdim=16, is_mimo=True, mimo_rank=4),
    "mimo1-norm": dict(d_state=16, headdim=8, is_mimo=True, mimo_rank=1, is_outproj_norm=True),  # MIMO weights, R 1
    "postgate-grouped": dict(d_state=16, headdim=8, out_norm="postgate_grouped", discretization="half"),
    "pregate-default": dict(d_state=16, headdim=8, out_norm="pregate_default", is_mimo=True, mimo_rank=2),
    "postgate-default-euler-norot": dict(d_state=16, headdim=8, out_norm="postgate_default", discretization="euler",
                                        rotation=False, bc_bias=False, a_activation="softplus"),
}


def make_layer(name, dtype=torch.float32, seed=0):
    kw = dict(LAYERS[name])
    d_model = kw.pop("d_model", 32)
    torch.manual_seed(seed)
    m = Mamba3(d_model=d_model, chunk_size=4, dtype=dtype, **kw)
    return randomize_mamba3_(m, seed=seed).to(DEVICE)


def clone_state(cache):
    return Mamba3State(*(t.clone() for t in cache.state))


def assert_states_close(a: Mamba3State, b: Mamba3State, tol=TOL):
    for name, x, y in zip(Mamba3State._fields, a, b):
        if name == "angle":  # compare angles on the circle
            if x.numel() == 0:
                continue
            diff = torch.remainder(x - y + math.pi, 2 * math.pi) - math.pi
            assert float(diff.abs().max()) <= 1e-4, name
        else:
            assert rel_err(x, y) <= tol, name


@pytest.mark.parametrize("name", list(LAYERS))
def test_reference_decode_step_equals_module_step(name):
    """The fused-step reference (via the cache) == the unfused step (via initial_state)."""
    m = make_layer(name)
    cache = random_decode_state(m, batch=3, seed=1)
    u = torch.randn(3, 1, m.d_model, device=DEVICE)
    before = clone_state(cache)
    with torch.no_grad():
        unfused, state = m(u, initial_state=before, return_final_state=True)
        fused = m(u, cache=cache)
    assert rel_err(fused, unfused) <= TOL
    assert_states_close(cache.state, state)


@pytest.mark.parametrize("name", list(LAYERS))
def test_triton_decode_step_matches_reference(name):
    """Three steps in a row, so the state each kernel wrote in place is the next step's input."""
    m = make_layer(name)
    layout, params = m.decode_layout(), m.decode_params()
    cache = random_decode_state(m, batch=2, seed=2)
    ref_state = clone_state(cache)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _ in range(3):
            proj = torch.randn(2, sum(layout.split_sizes()), generator=gen).to(DEVICE)
            ref = oracle.mamba3_decode_step(proj, ref_state, params, layout)
            ours = triton_kernels.mamba3_decode_step(proj, cache.state, params, layout)
            assert rel_err(ours, ref) <= TOL
            assert_states_close(cache.state, ref_state)


def test_dispatch_falls_back_with_one_warning():
    """A forced Triton step on inputs it cannot take (fp64 state) runs the reference, warning once."""
    m = make_layer("siso", dtype=torch.float64)
    cache = random_decode_state(m, batch=2)
    proj = torch.randn(2, sum(m.decode_layout().split_sizes()), dtype=torch.float64, device=DEVICE)
    ref_state = clone_state(cache)
    ref = oracle.mamba3_decode_step(proj, ref_state, m.decode_params(), m.decode_layout())
    with pytest.warns(UserWarning, match="fp32 state"):
        out = dispatch.mamba3_decode_step(proj, cache.state, m.decode_params(), m.decode_layout(), backend="triton")
    assert rel_err(out, ref) <= 1e-12
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dispatch.mamba3_decode_step(proj, cache.state, m.decode_params(), m.decode_layout(), backend="triton")


def test_cute_step_refuses_cpu_and_splits_rows_sensibly():
    from hybridlm.kernels.mamba3 import cute

    m = make_layer("siso")
    cache = random_decode_state(m, batch=1)
    reason = cute.unsupported_reason(torch.zeros(1, 4), cache.state, m.decode_layout())
    assert "CUDA" in reason
    for P in (16, 32, 48, 64, 96, 128):
        for N in (16, 32, 64, 128, 256):
            groups = cute.row_groups(P, N)
            threads = groups * N // cute.VEC
            assert P % groups == 0 and threads % 32 == 0 and P // groups <= 8 and threads <= 1024, (P, N)


# MIMO with headdim 192/256 and d_state 256: no split of the state rows keeps a thread at the 4
# rows MIMO allows (SISO, at 8 rows a thread, fits). The CuTe check once ran the split at rank 1
# and passed these, then the compile (at the layer's rank) failed instead of falling back.
CUTE_UNSPLITTABLE = [(384, 256, 2), (512, 256, 4)]  # 8 rows a thread at most: more than 1,024 threads


def cute_layout(headdim, d_state, rank):
    return DecodeLayout(nheads=2, headdim=headdim, ngroups=1, rank=rank, d_state=d_state, n_angles=d_state // 4,
                        pair_layout="interleaved" if rank == 1 else "half")


@pytest.mark.parametrize("headdim,d_state,rank", CUTE_UNSPLITTABLE)
def test_cute_check_refuses_what_its_compile_cannot_build(monkeypatch, headdim, d_state, rank):
    """The check and the compile read one kernel_config: these shapes are refused with a reason (so the
    dispatcher falls back); with more rows a thread (cute_max_rows) the same shapes are taken."""
    from hybridlm.kernels.mamba3 import cute

    layout = cute_layout(headdim, d_state, rank)
    config = cute.kernel_config(layout, torch.bfloat16, torch.bfloat16)
    assert isinstance(config, str) and f"headdim {headdim}" in config and f"rank {rank}" in config
    wider = cute.kernel_config(layout, torch.bfloat16, torch.bfloat16, KernelTuning(cute_max_rows=16))
    assert isinstance(wider, cute.StepConfig) and headdim // wider.row_groups <= 16

    # unsupported_reason, past its device and import checks, gives the same reason
    monkeypatch.setattr(cute, "hopper_reason", lambda *a: None)
    monkeypatch.setattr(cute, "import_error", lambda: None)
    state = Mamba3State(angle=torch.zeros(1, 2, layout.n_angles), ssm=torch.zeros(1, 2, headdim, d_state),
                        k=torch.zeros(1, rank, 2, d_state, dtype=torch.bfloat16),
                        v=torch.zeros(1, 2, headdim, dtype=torch.bfloat16))
    proj = torch.zeros(1, layout.in_proj.width, dtype=torch.bfloat16)
    assert cute.unsupported_reason(proj, state, layout) == config


def test_cute_step_compiles_the_config_its_check_accepted(monkeypatch):
    """The step asks kernel_config for what to compile (the compile cache's key); a tuning knob
    changes that key, so a kernel compiled under other knobs is never reused."""
    from hybridlm.kernels.mamba3 import cute

    m = make_layer("mimo4")
    layout, params = m.decode_layout(), m.decode_params()
    cache = random_decode_state(m, batch=2)
    compiled = []
    monkeypatch.setattr(cute, "_compiled", lambda config, *rest: compiled.append(config) or (lambda *a: None))
    proj = torch.zeros(2, layout.in_proj.width)
    cute.mamba3_decode_step(proj, cache.state, params, layout)
    with use_tuning(cute_max_rows=1, cute_min_blocks=3):
        cute.mamba3_decode_step(proj, cache.state, params, layout)
    default, tuned = compiled
    assert default == cute.kernel_config(layout, torch.float32, torch.float32)
    assert tuned == cute.kernel_config(layout, torch.float32, torch.float32, KernelTuning(cute_max_rows=1,
                                                                                        cute_min_blocks=3))
    assert (tuned.row_groups, tuned.min_blocks) == (layout.headdim, 3) != (default.row_groups, default.min_blocks)
    assert default.prerotate  # MIMO's default: B and C rotated once per CTA
    with use_tuning(cute_prerotate=0):
        cute.mamba3_decode_step(proj, cache.state, params, layout)
    assert compiled[-1] == default._replace(prerotate=False) != default
    siso = Mamba3(d_model=32, d_state=32, headdim=16, chunk_size=4).decode_layout()  # mimo4's shape at rank 1
    assert not cute.kernel_config(siso, torch.float32, torch.float32).prerotate
    assert cute.kernel_config(siso, torch.float32, torch.float32, KernelTuning(cute_prerotate=1)).prerotate

    refused = cute_layout(*CUTE_UNSPLITTABLE[0])
    state = Mamba3State(angle=torch.zeros(1, 2, refused.n_angles), ssm=torch.zeros(1, 2, 384, 256),
                        k=torch.zeros(1, 2, 2, 256), v=torch.zeros(1, 2, 384))
    with pytest.raises(ValueError, match="headdim 384"):
        cute.mamba3_decode_step(torch.zeros(1, refused.in_proj.width), state, params, refused)


def test_the_probe_overrides_the_cute_steps_arithmetic():
    """benchmarks/cute_step_probe.py times the CuTe step with parts of its arithmetic left out by overriding two
    methods (the CuTe DSL does not import here, so the check reads the sources): the methods exist with the
    probe's arguments, and the kernel adds every rank's terms and reads every row out through them alone."""
    import ast

    root = Path(__file__).resolve().parents[1]

    def methods(path, cls):
        tree = ast.parse(path.read_text())
        [node] = [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == cls]
        return {f.name: f for f in node.body if isinstance(f, ast.FunctionDef)}

    step = methods(root / "hybridlm/kernels/mamba3/cute/step.py", "Mamba3DecodeStep")
    probe = methods(root / "benchmarks/cute_step_probe.py", "Probe")
    args = lambda f: [a.arg for a in f.args.args]  # noqa: E731
    for hook, expected in (("_add_rank_terms", ["self", "vals", "cg", "k", "cb", "k_prev"]),
                           ("_row_dot", ["self", "vals", "q"])):
        assert args(probe[hook]) == args(step[hook]) == expected, hook
        calls = [n for n in ast.walk(step["kernel"]) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
                 and n.func.attr == hook]
        assert len(calls) == 1, hook
    kernel = ast.unparse(step["kernel"])
    assert "k_prev[s]" not in kernel and "* q[s]" not in kernel  # no rank term or read-out outside the hooks


def test_kernel_tuning_reads_the_environment_once_and_checks_values():
    assert tuning_from_env({}) == KernelTuning()
    tuned = tuning_from_env({"HYBRIDLM_TRITON_WARPS": "8", "HYBRIDLM_CUTE_MAX_ROWS": "2"})
    assert (tuned.triton_warps, tuned.cute_max_rows, tuned.triton_block_pairs) == (8, 2, 16)
    with pytest.raises(ValueError, match="HYBRIDLM_TRITON_BLOCK_PAIRS"):
        tuning_from_env({"HYBRIDLM_TRITON_BLOCK_PAIRS": "sixteen"})
    with pytest.raises(ValueError, match="power of two"):
        KernelTuning(triton_block_pairs=12)
    with pytest.raises(ValueError, match="positive"):
        KernelTuning(cute_max_rows=0)
