"""The Mamba-3 module: official parameter layout, gradients, states, packing, decode API."""
import pytest
import torch
from torch.func import functional_call

from hybridlm.blocks import Mamba3
from hybridlm.errors import BackendUnavailable, ShapeError
from hybridlm.testing import randomize_mamba3_, rel_err

BF16, FP32 = torch.bfloat16, torch.float32


def official_layout(d_model=256, d_state=128, headdim=64, expand=2, ngroups=1, rope_fraction=0.5, R=1,
                    mimo=False, outproj_norm=False, dtype=BF16):
    """Names, shapes and dtypes of the official module's state_dict, transcribed from docs/mamba3.md §1.2/§1.3."""
    d_inner = expand * d_model
    H = d_inner // headdim
    split = int(d_state * rope_fraction)
    S = (split - split % 2) // 2
    d_in_proj = 2 * d_inner + 2 * d_state * ngroups * R + 3 * H + S
    layout = {
        "in_proj.weight": ((d_in_proj, d_model), dtype),
        "dt_bias": ((H,), FP32),
        "B_bias": ((H, R, d_state), FP32),
        "C_bias": ((H, R, d_state), FP32),
        "B_norm.weight": ((d_state,), dtype),
        "C_norm.weight": ((d_state,), dtype),
        "D": ((H,), FP32),
        "out_proj.weight": ((d_model, d_inner), dtype),
    }
    if mimo:
        for name in ("mimo_x", "mimo_z", "mimo_o"):
            layout[name] = ((H, R, headdim), FP32)
    if outproj_norm:
        layout["norm.weight"] = ((d_inner,), dtype)
    return layout


LAYOUTS = {
    "siso": (dict(d_model=256), dict()),
    "siso-norm-groups-rope1": (dict(d_model=256, ngroups=2, rope_fraction=1.0, is_outproj_norm=True),
                               dict(ngroups=2, rope_fraction=1.0, outproj_norm=True)),
    "mimo4": (dict(d_model=256, is_mimo=True, mimo_rank=4, chunk_size=16), dict(R=4, mimo=True)),
    "small-dims": (dict(d_model=96, d_state=64, headdim=32, expand=2), dict(d_model=96, d_state=64, headdim=32)),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_official_parameter_layout(name):
    ctor, layout_kw = LAYOUTS[name]
    module = Mamba3(**ctor, dtype=BF16)
    want = official_layout(**layout_kw)
    got = {k: (tuple(v.shape), v.dtype) for k, v in module.state_dict().items()}
    assert got == want


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_official_state_dict_loads_strict_and_round_trips(name):
    ctor, layout_kw = LAYOUTS[name]
    g = torch.Generator().manual_seed(3)
    official = {k: torch.randn(shape, generator=g).to(dtype) for k, (shape, dtype) in official_layout(**layout_kw).items()}
    module = Mamba3(**ctor, dtype=BF16)
    module.load_state_dict(official, strict=True)
    back = module.state_dict()
    assert back.keys() == official.keys()
    for key, tensor in official.items():
        assert back[key].dtype == tensor.dtype and torch.equal(back[key], tensor), key
    clone = Mamba3(**ctor, dtype=BF16)
    clone.load_state_dict(back, strict=True)
    u = torch.randn(2, 9, ctor["d_model"]).to(BF16)
    assert torch.equal(clone(u), module(u))


def test_official_init():
    m = Mamba3(d_model=64, d_state=16, headdim=16, is_mimo=True, mimo_rank=4, dt_min=0.01, dt_max=0.05)
    dt = torch.nn.functional.softplus(m.dt_bias)
    dt = dt.detach()
    assert float(dt.min()) >= 0.01 * 0.999 and float(dt.max()) <= 0.05 * 1.001
    assert torch.all(m.B_bias == 1) and torch.all(m.C_bias == 1) and torch.all(m.D == 1)
    assert torch.allclose(m.mimo_x, torch.full_like(m.mimo_x, 0.25)) and torch.all(m.mimo_z == 1)
    assert m.dt_bias._no_weight_decay and m.D._no_weight_decay


VARIANTS = {
    "siso": dict(),
    "siso-norm": dict(is_outproj_norm=True, ngroups=2),
    "mimo": dict(is_mimo=True, mimo_rank=2, ngroups=2, is_outproj_norm=True),
    "mimo1": dict(is_mimo=True, mimo_rank=1, is_outproj_norm=True),  # MIMO weights at rank 1
    "mamba2-like": dict(conv_kernel=3, discretization="euler", rotation=False, bc_bias=False,
                        out_norm="postgate_default", a_activation="softplus"),
    "half-lambda": dict(discretization="half", out_norm="pregate_default"),
}


def small_module(variant, dtype=torch.float32, d_model=32, seed=0):
    torch.manual_seed(seed)
    m = Mamba3(d_model=d_model, d_state=8, headdim=8, chunk_size=4, dtype=dtype, **VARIANTS[variant])
    return randomize_mamba3_(m, seed=seed)


@pytest.mark.parametrize("variant", ["siso-norm", "mimo", "mamba2-like"])
def test_gradcheck_fp64(variant):
    m = Mamba3(d_model=8, d_state=4, headdim=4, chunk_size=4, dtype=torch.float64, **VARIANTS[variant])
    randomize_mamba3_(m, seed=1)
    m = m.double()
    names = [n for n, _ in m.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in m.parameters())
    u = torch.randn(1, 7, 8, dtype=torch.float64, requires_grad=True)

    def f(u, *ps):
        return functional_call(m, dict(zip(names, ps)), (u,))

    assert torch.autograd.gradcheck(f, (u, *params), eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cache_continuation_equals_whole(variant):
    """Prefill in pieces, then single-token steps, through the cache == one forward."""
    m = small_module(variant)
    u = torch.randn(2, 30, 32)
    whole = m(u)
    cache = m.allocate_cache(2)
    pieces = [m(u[:, :11], cache=cache), m(u[:, 11:20], cache=cache)]
    pieces += [m(u[:, t: t + 1], cache=cache) for t in range(20, 30)]
    assert rel_err(torch.cat(pieces, 1), whole) <= 1e-5


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_packed_equals_separate(variant):
    m = small_module(variant)
    lengths = [7, 1, 16, 9]
    u = torch.randn(1, sum(lengths), 32)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    packed, states = m(u, cu_seqlens=cu, return_final_state=True)
    for i, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        alone, state = m(u[:, s:e], return_final_state=True)
        assert rel_err(packed[:, s:e], alone) <= 1e-5
        for a, b in zip(states, state):
            assert rel_err(a[i: i + 1], b) <= 1e-5


def test_official_step_api():
    m = small_module("siso-norm")
    u = torch.randn(3, 12, 32)
    whole = m(u)
    angle, ssm, k, v = m.allocate_inference_cache(3, max_seqlen=12)
    assert angle.dtype == ssm.dtype == FP32 and k.shape == (3, 1, m.nheads, 8) and v.shape == (3, m.nheads, 8)
    outs = []
    for t in range(12):
        out, angle2, ssm2, k2, v2 = m.step(u[:, t], angle, ssm, k, v)
        assert angle2 is angle and ssm2 is ssm  # updated in place, as the official step
        outs.append(out)
    assert rel_err(torch.stack(outs, 1), whole) <= 1e-5


def test_bf16_module_close_to_fp32():
    m32 = small_module("mimo")
    m16 = small_module("mimo", dtype=BF16)
    m16.load_state_dict({k: v.to(m16.state_dict()[k].dtype) for k, v in m32.state_dict().items()})
    u = torch.randn(2, 40, 32)
    err = rel_err(m16(u.to(BF16)).float(), m32(u))
    assert err < 3e-2  # bf16 weights, activations and output; fp32 inside the reference


def test_initial_state_gradients_flow():
    m = small_module("siso")
    u = torch.randn(1, 10, 32)
    _, st = m(u[:, :4], return_final_state=True)
    st = type(st)(*(t.detach().requires_grad_() for t in st))
    out = m(u[:, 4:], initial_state=st)
    grads = torch.autograd.grad(out.sum(), st)
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_bad_inputs_give_clear_errors():
    m = small_module("siso")
    with pytest.raises(ShapeError, match=r"expects \(batch, seq, 32\)"):
        m(torch.randn(2, 5, 31))
    with pytest.raises(ValueError, match="ngroups"):
        Mamba3(d_model=32, d_state=8, headdim=8, ngroups=3)
    with pytest.raises(ValueError, match="rope_fraction"):
        Mamba3(d_model=32, d_state=8, headdim=8, rope_fraction=0.25)
    m.backend = "cute"  # the CuTe DSL is not installed here: a clear error naming what to install
    with pytest.raises(BackendUnavailable, match="nvidia-cutlass-dsl"):
        m(torch.randn(1, 3, 32))
    m.backend = "nonsense"
    with pytest.raises(BackendUnavailable, match="choose one of"):
        m(torch.randn(1, 3, 32))
