"""The Mamba-3 decode-step kernels on the GPU: CuTe and Triton against the reference step, a
CUDA-graph step against eager, a 64K prefill + 4K steps against the chunked reference, and the
official step (mamba_ssm 2.3.2.post1, CuTe) on the same weights and cache.

Tolerances (norm-wise relative): the fp32 SSM state ≤ 1e-5 (both compute it in fp32 from the same
bf16 inputs); bf16 outputs and the bf16 k cache ≤ 1e-2; angles ≤ 1e-4 rad on the circle.
Set HYBRIDLM_RESULTS_STEP=path.json to write the measured errors.
"""
import math
import warnings

import pytest
import torch

from hybridlm.blocks import Mamba3
from hybridlm.kernels import dispatch
from hybridlm.kernels.mamba3 import oracle
from hybridlm.kernels.mamba3.contract import Mamba3State
from hybridlm.kernels.mamba3.tuning import KernelTuning, use_tuning
from hybridlm.testing import random_decode_state, randomize_mamba3_, rel_err, write_results

pytestmark = pytest.mark.gpu
BF16 = torch.bfloat16
RESULTS: dict = {}

# name: Mamba3 keyword arguments; d_model sets the number of heads (d_inner = 2 d_model)
CONFIGS = {
    "siso-N128-P64": dict(d_model=256, d_state=128, headdim=64),
    "siso-N64-P64-norm": dict(d_model=256, d_state=64, headdim=64, is_outproj_norm=True),
    "siso-N16-P16-G4": dict(d_model=64, d_state=16, headdim=16, ngroups=4),
    "siso-N256-P32-G2-rope1": dict(d_model=128, d_state=256, headdim=32, ngroups=2, rope_fraction=1.0),
    "siso-N32-P128-half-postgate": dict(d_model=256, d_state=32, headdim=128, discretization="half",
                                        out_norm="postgate_grouped"),
    "mimo2-N64-P32-G2-norm": dict(d_model=128, d_state=64, headdim=32, ngroups=2, is_mimo=True, mimo_rank=2,
                                  is_outproj_norm=True),
    "mimo4-N128-P64-norm": dict(d_model=256, d_state=128, headdim=64, is_mimo=True, mimo_rank=4,
                                is_outproj_norm=True),
    "mimo8-N64-P64": dict(d_model=128, d_state=64, headdim=64, is_mimo=True, mimo_rank=8),
    "mimo4-pregate-default": dict(d_model=128, d_state=64, headdim=32, is_mimo=True, mimo_rank=4,
                                  out_norm="pregate_default"),
    "euler-norot-nobias": dict(d_model=128, d_state=64, headdim=64, discretization="euler", rotation=False,
                               bc_bias=False, a_activation="softplus"),
}


@pytest.fixture(scope="module", autouse=True)
def _write_results():
    yield
    write_results("HYBRIDLM_RESULTS_STEP", RESULTS)


def make_layer(name, dtype=BF16, seed=0):
    torch.manual_seed(seed)
    m = Mamba3(chunk_size=64, device="cuda", dtype=dtype, **CONFIGS[name])
    return randomize_mamba3_(m, seed=seed)


def angle_error(a, b):
    if a.numel() == 0:
        return 0.0
    return float((torch.remainder(a - b + math.pi, 2 * math.pi) - math.pi).abs().max())


def state_errors(ours: Mamba3State, ref: Mamba3State) -> dict:
    return dict(ssm=rel_err(ours.ssm, ref.ssm), k=rel_err(ours.k, ref.k), v=rel_err(ours.v, ref.v),
                angle=angle_error(ours.angle, ref.angle))


def check_state(errs):
    assert errs["ssm"] <= 1e-5 and errs["k"] <= 1e-2 and errs["v"] == 0 and errs["angle"] <= 1e-4, errs


def step_kernel(backend):
    """(step, unsupported_reason) of one kernel, called directly: no fallback can hide it."""
    if backend == "cute":
        skip_without_cute()
        from hybridlm.kernels.mamba3 import cute

        return cute.mamba3_decode_step, cute.unsupported_reason
    from hybridlm.kernels.mamba3 import triton

    return triton.mamba3_decode_step, triton.step_unsupported_reason


@pytest.mark.parametrize("backend", ["cute", "cute-prerotate", "triton"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_step_kernel_matches_reference(backend, name):
    """cute: each thread rotates its slots of B and C (SISO's default); cute-prerotate: B and C rotated once
    per CTA (KernelTuning.cute_prerotate, MIMO's default)."""
    step, unsupported_reason = step_kernel(backend.split("-")[0])
    m = make_layer(name)
    layout, params = m.decode_layout(), m.decode_params()
    cache = random_decode_state(m, batch=5, seed=1)
    assert unsupported_reason(torch.empty(1, device="cuda", dtype=BF16), cache.state, layout) is None
    gen = torch.Generator(device="cuda").manual_seed(2)
    worst = {}
    with use_tuning(cute_prerotate=int(backend == "cute-prerotate")), torch.no_grad():
        for _ in range(4):
            # each step starts from the state the kernel wrote in place; the reference starts from a
            # copy of it, so a bf16 k that rounds the other way in one step cannot compound
            ref_state = Mamba3State(*(t.clone() for t in cache.state))
            proj = torch.randn(5, layout.in_proj.width, device="cuda", generator=gen).to(BF16)
            ref = oracle.mamba3_decode_step(proj, ref_state, params, layout)
            out = step(proj, cache.state, params, layout)
            errs = dict(out=rel_err(out, ref), **state_errors(cache.state, ref_state))
            worst = {k: max(v, worst.get(k, 0.0)) for k, v in errs.items()}
    RESULTS.setdefault(f"{backend}/{name}", {}).update(worst)
    assert worst["out"] <= 1e-2, worst
    check_state(worst)


def skip_without_cute():
    from hybridlm.kernels.mamba3 import cute

    if cute.import_error():
        pytest.skip(cute.import_error())


# MIMO with headdim 192/256 and d_state 256: no split of the state rows fits the CuTe step
@pytest.mark.parametrize("headdim,rank", [(192, 2), (256, 4)])
def test_cute_step_falls_back_where_it_cannot_compile(headdim, rank):
    """Forced onto the CuTe backend, such a layer warns once that the CuTe step hands it on and
    computes what the reference step computes (the Triton step takes headdim up to 128)."""
    skip_without_cute()
    torch.manual_seed(0)
    m = randomize_mamba3_(Mamba3(d_model=headdim, d_state=256, headdim=headdim, is_mimo=True, mimo_rank=rank,
                                 chunk_size=64, device="cuda", dtype=BF16), seed=0)
    layout, params = m.decode_layout(), m.decode_params()
    cache = random_decode_state(m, batch=3, seed=1)
    gen = torch.Generator(device="cuda").manual_seed(2)
    with torch.no_grad():
        for step in range(2):
            ref_state = Mamba3State(*(t.clone() for t in cache.state))
            proj = torch.randn(3, layout.in_proj.width, device="cuda", generator=gen).to(BF16)
            ref = oracle.mamba3_decode_step(proj, ref_state, params, layout)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                out = dispatch.mamba3_decode_step(proj, cache.state, params, layout, backend="cute")
            cute_warnings = [str(w.message) for w in caught if "cute" in str(w.message).lower()]
            assert len(cute_warnings) == (1 if step == 0 else 0), cute_warnings
            if step == 0:
                assert f"headdim {headdim}" in cute_warnings[0], cute_warnings
            assert rel_err(out, ref) <= 1e-2
            check_state(state_errors(cache.state, ref_state))


def test_cute_tuning_knobs_compile_another_kernel():
    """A CuTe tiling knob changes the compiled kernel (2 state rows a thread instead of 8), and the
    kernel compiled under it still matches the reference step."""
    skip_without_cute()
    from hybridlm.kernels.mamba3 import cute

    m = make_layer("siso-N128-P64")
    layout, params = m.decode_layout(), m.decode_params()
    cache = random_decode_state(m, batch=5, seed=1)
    with use_tuning(cute_max_rows=2, cute_min_blocks=1), torch.no_grad():
        config = cute.kernel_config(layout, BF16, BF16)
        assert config != cute.kernel_config(layout, BF16, BF16, tuning=KernelTuning())
        assert layout.headdim // config.row_groups <= 2
        ref_state = Mamba3State(*(t.clone() for t in cache.state))
        proj = torch.randn(5, layout.in_proj.width, device="cuda").to(BF16)
        ref = oracle.mamba3_decode_step(proj, ref_state, params, layout)
        out = cute.mamba3_decode_step(proj, cache.state, params, layout)
    assert rel_err(out, ref) <= 1e-2
    check_state(state_errors(cache.state, ref_state))


@pytest.mark.parametrize("name", ["siso-N128-P64", "mimo4-N128-P64-norm"])
def test_cuda_graph_step_equals_eager(name):
    """A whole layer step (in_proj, step kernel, out_proj) replayed from a CUDA graph == eager."""
    m = make_layer(name)
    eager_cache = random_decode_state(m, batch=3, seed=4)
    graph_cache = random_decode_state(m, batch=3, seed=4)
    static_u = torch.zeros(3, 1, m.d_model, device="cuda", dtype=BF16)
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # compile and warm up outside the capture, on a scratch cache
            m(static_u, cache=random_decode_state(m, batch=3, seed=9))
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = m(static_u, cache=graph_cache)
        for t in range(5):
            u = torch.randn(3, 1, m.d_model, device="cuda").to(BF16)
            static_u.copy_(u)
            graph.replay()
            eager = m(u, cache=eager_cache)
            assert torch.equal(static_out, eager), t
    for a, b in zip(graph_cache.state, eager_cache.state):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["siso-N128-P64", "mimo4-N128-P64-norm"])
def test_long_prefill_then_steps_match_chunked_reference(name):
    """64K tokens of prefill (Triton, states out), then 4K decode steps == one chunked pass."""
    m = make_layer(name)
    prefill, steps = 65536, 4096
    u = (torch.randn(1, prefill + steps, m.d_model, device="cuda") * 0.5).to(BF16)
    ref_m = make_layer(name, dtype=torch.float32)
    ref_m.load_state_dict({k: v.float() for k, v in m.state_dict().items()})  # the same (bf16) values
    ref_m.backend = "reference"
    with torch.no_grad():
        ref = ref_m(u.float())[:, prefill:]
        cache = m.allocate_cache(1)
        m(u[:, :prefill], cache=cache)
        outs = [m(u[:, t: t + 1], cache=cache) for t in range(prefill, prefill + steps)]
    err = rel_err(torch.cat(outs, 1), ref)
    RESULTS.setdefault(f"long/{name}", {})["steps_vs_chunked_reference"] = err
    assert err <= 1e-2, err


def official_module(kw, mimo_rank=None):
    """The official module (bf16, softplus A); MIMO needs its TileLang import bypassed (docs box)."""
    official_mod = pytest.importorskip("mamba_ssm.modules.mamba3")
    if mimo_rank:
        official_mod.mamba3_mimo_combined = official_mod.mamba3_mimo_combined or object()
        kw = dict(kw, is_mimo=True, mimo_rank=mimo_rank)
    torch.manual_seed(0)
    return randomize_mamba3_(official_mod.Mamba3(**kw, layer_idx=0, device="cuda", dtype=BF16), seed=1)


@pytest.mark.parametrize("mimo_rank", [None, 4])
def test_official_step_agrees(mimo_rank):
    """Same weights and cache: the official CuTe step and ours, both against our fp64 step."""
    kw = dict(d_model=256, d_state=128, headdim=64, ngroups=1, rope_fraction=0.5, chunk_size=64)
    official = official_module(kw, mimo_rank)
    extra = dict(is_mimo=True, mimo_rank=mimo_rank) if mimo_rank else {}
    ours = Mamba3(**kw, **extra, a_activation="softplus", device="cuda", dtype=BF16)
    ours.load_state_dict(official.state_dict(), strict=True)
    exact = Mamba3(**kw, **extra, a_activation="softplus", device="cuda", dtype=torch.float64)
    exact.load_state_dict({k: v.double() for k, v in official.state_dict().items()}, strict=True)
    exact.backend = "reference"
    cache = random_decode_state(ours, batch=4, seed=3)
    off_state = [t.clone() for t in cache.state]
    exact_cache = exact.allocate_cache(4)
    for dst, src in zip(exact_cache.state, cache.state):
        dst.copy_(src)
    errs = {"official_out": 0.0, "ours_out": 0.0}
    with torch.no_grad():
        for _ in range(8):
            u = torch.randn(4, 256, device="cuda").to(BF16)
            y_exact = exact(u.double()[:, None], cache=exact_cache)[:, 0]
            y_off = official.step(u, *off_state)[0]
            y_ours = ours(u[:, None], cache=cache)[:, 0]
            errs["official_out"] = max(errs["official_out"], rel_err(y_off, y_exact))
            errs["ours_out"] = max(errs["ours_out"], rel_err(y_ours, y_exact))
    errs["ours_vs_official_ssm"] = rel_err(cache.ssm, off_state[1])
    RESULTS[f"official/{'mimo' + str(mimo_rank) if mimo_rank else 'siso'}"] = errs
    assert errs["ours_out"] <= max(1e-2, 1.25 * errs["official_out"]), errs
    assert errs["ours_vs_official_ssm"] <= 1e-2, errs
