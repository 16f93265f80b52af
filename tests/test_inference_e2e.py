"""Inference end to end on the CPU (issue 21): the fused residual add + RMSNorm kernel against its
reference, the model's fused inference path against the blocks' own path, prefill + teacher-forced
steps of every family against the full forward (fp32, and bf16 against its measured bound),
chunked prefill against unchunked, the compiled step against the eager one, and the generation
benchmark's quick run. Triton runs under TRITON_INTERPRET=1 (tests/conftest.py) at small shapes.
"""
import collections
import importlib.util
import json
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hybridlm import build_model, get_preset, spec_from_yaml
from hybridlm.blocks import Attention, RMSNorm, SwiGLU
from hybridlm.builder import Decoder
from hybridlm.builder.inference import decoder as decoder_module
from hybridlm.errors import ShapeError
from hybridlm.kernels import registry
from hybridlm.kernels.rmsnorm import add_rms_norm, reference
from hybridlm.kernels.rope import reference as rope_reference
from hybridlm.kernels.rope import rope_qk
from hybridlm.kernels.swiglu_gate import reference as swiglu_reference
from hybridlm.kernels.swiglu_gate import silu_mul_
from hybridlm.kernels.tickets import counters
from hybridlm.testing import randomize_mamba3_, rel_err
from test_decode import tiny_model

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="needs triton (TRITON_INTERPRET=1 on the CPU)")
FAMILIES = ["hybrid-tiny", "mamba3-tiny", "mamba3-mimo-tiny", "transformer-tiny"]
# Two paths that differ only in summation order (chunked scan vs recurrence, attention over the
# sequence vs over the cache, a tree sum of squares vs torch's mean): measured ~2e-7 in fp32,
# ~5e-16 in fp64 (tests/test_decode.py).
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}
STEPS = 64


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny shapes: a second thread only adds OpenMP waits (on the shared 2-core machine, 64 steps
    of hybrid-tiny took 42 s on two threads, 1.2 s on one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def family_model(name: str, dtype=torch.float32):
    model = build_model(get_preset(name), dtype=dtype, seed=0)
    for layer in model.layers:
        if hasattr(layer.mixer, "B_norm"):
            randomize_mamba3_(layer.mixer, seed=layer.mixer.layer_idx)
    return model.eval()


def use_kernel_backend(model, name):
    """The fused norms', SwiGLU gates' and GEMVs' and RoPE's backend (``triton``: the GPU's kernels,
    interpreted here)."""
    for m in model.modules():
        if isinstance(m, RMSNorm):
            m.backend = name
        if isinstance(m, SwiGLU):
            m.gate_backend = name
        if hasattr(m, "gemv_backend"):  # SwiGLU, Mamba3
            m.gemv_backend = name
        if isinstance(m, Attention):
            m.rope_backend = m.kv_backend = name


# -- the kernel -----------------------------------------------------------------------------------
# (stream dtype, residual dtype, weight dtype, out dtype): plain fp32 and bf16, then residual_in_fp32
# (an fp32 stream, bf16 block outputs and weights)
DTYPE_CASES = [(torch.float32,) * 4, (torch.bfloat16,) * 4,
               (torch.float32, torch.bfloat16, torch.bfloat16, torch.bfloat16)]


@needs_triton
@pytest.mark.parametrize("dtypes", DTYPE_CASES, ids=["fp32", "bf16", "fp32-stream"])
@pytest.mark.parametrize("with_residual", [True, False])
def test_triton_add_rms_norm_matches_reference(dtypes, with_residual):
    """fp32: the stream bitwise, the normed rows 1e-6 apart (only the order of the sum of squares
    differs). bf16: on the GPU the stream is bitwise and the normed rows one rounding step apart
    (tests/gpu/test_inference_e2e_gpu.py), but Triton 3.6's interpreter rounds fp32 -> bf16
    toward zero (the GPU and torch: to nearest even), so here the stream may be one step off and
    the normed rows, rounded from it and rounded again, two."""
    stream_dt, res_dt, w_dt, out_dt = dtypes
    h = torch.randn(3, 5, 48).to(stream_dt)  # 48: not a power of two, the row is masked
    residual = torch.randn(3, 5, 48).to(res_dt) if with_residual else None
    weight = (torch.rand(48) + 0.5).to(w_dt)
    got, got_stream = add_rms_norm(h, residual, weight, 1e-5, out_dtype=out_dt, backend="triton")
    want, want_stream = reference.add_rms_norm(h, residual, weight, 1e-5, out_dt)
    assert got.dtype == out_dt and got_stream.dtype == stream_dt
    if stream_dt == torch.float32:
        assert torch.equal(got_stream, want_stream)
    else:
        assert within_steps(got_stream, want_stream, 1)
    if out_dt == torch.float32:
        assert rel_err(got, want) <= 1e-6
    else:
        assert within_steps(got, want, 2)


def within_steps(got, want, steps):
    """Elementwise at most ``steps`` bf16 rounding steps apart (a step is at most 2^-7 of the value)."""
    return bool(((got.float() - want.float()).abs() <= want.float().abs() * steps * 2**-7).all())


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_swiglu_gate_matches_reference(dtype):
    """In place, silu rounded to the dtype, then the product: fp32 1e-6 (exp's rounding); bf16 two
    rounding steps on the CPU (the interpreter rounds toward zero, see above), one on the GPU."""
    gate, value = torch.randn(3, 5, 40).to(dtype), torch.randn(3, 5, 40).to(dtype)  # 600: a partial block
    want = swiglu_reference.silu_mul(gate, value)
    buffer = gate.clone()
    got = silu_mul_(buffer, value, backend="triton")
    assert got.data_ptr() == buffer.data_ptr()  # written into the gate's buffer
    if dtype == torch.float32:
        assert rel_err(got, want) <= 1e-6
    else:
        assert within_steps(got, want, 2)


def round_toward_zero(t: torch.Tensor) -> torch.Tensor:
    """fp32 -> bf16 as the Triton interpreter converts (the GPU rounds to nearest)."""
    return (t.float().view(torch.int32) & -65536).view(torch.float32)


@needs_triton
@pytest.mark.parametrize("rows,hidden,d_model", [(1, 96, 200), (5, 40, 300), (16, 17, 513)])
def test_triton_swiglu_gemv_matches_reference(rows, hidden, d_model):
    """silu(x w1ᵀ) * (x w3ᵀ) in one kernel, hidden and d_model not multiples of its blocks: fp32 within
    1e-6 of the reference (summation order); bf16 bitwise the exact products summed in fp64 and
    rounded as the kernel rounds (the projections, silu, the product), here toward zero as the
    interpreter does, and within four rounding steps of the reference's GEMMs (three roundings,
    toward zero here against the reference's to nearest)."""
    from hybridlm.kernels.decode_gemv import reference as up_reference
    from hybridlm.kernels.decode_gemv import silu_mul_gemv

    gen = torch.Generator().manual_seed(rows)
    x, w1, w3 = (torch.randn(*shape, generator=gen) / shape[-1] ** 0.5
                 for shape in ((rows, d_model), (hidden, d_model), (hidden, d_model)))
    assert rel_err(silu_mul_gemv(x, w1, w3, backend="triton"), up_reference.silu_mul_gemv(x, w1, w3)) <= 1e-6
    x, w1, w3 = x.bfloat16(), w1.bfloat16(), w3.bfloat16()
    got = silu_mul_gemv(x, w1, w3, backend="triton")
    gate = round_toward_zero((x.double() @ w1.double().T).float())
    up = round_toward_zero((x.double() @ w3.double().T).float())
    assert torch.equal(got.float(), round_toward_zero(round_toward_zero(F.silu(gate)) * up))
    assert within_steps(got, up_reference.silu_mul_gemv(x, w1, w3), 4)


@needs_triton
def test_swiglu_block_takes_the_gemv_only_at_decode_sizes_without_autograd():
    """The block runs w1, w3 and the gate as one kernel for at most 16 rows under no_grad; a longer
    input (a prefill) or autograd keeps the GEMMs (bitwise the plain block), and both paths agree."""
    torch.manual_seed(0)
    block = SwiGLU(48, 80)
    plain = SwiGLU(48, 80)
    plain.load_state_dict(block.state_dict())
    block.gemv_backend, plain.gemv_backend = "triton", "reference"
    with torch.no_grad():
        step, prefill = torch.randn(3, 1, 48), torch.randn(2, 9, 48)
        assert rel_err(block(step), plain(step)) <= 1e-6
        assert torch.equal(block(prefill), plain(prefill))  # 18 rows: the GEMMs
    trained = block(step)
    assert trained.grad_fn is not None and torch.equal(trained, plain(step))
    with torch.no_grad(), torch.profiler.profile() as prof:
        block(step)
    assert "hybridlm::silu_mul_gemv" in {e.name for e in prof.events()}


@needs_triton
@pytest.mark.parametrize("rows,n,d_model", [(1, 96, 200), (5, 40, 300), (16, 17, 513)])
@pytest.mark.parametrize("weights", ["gemv", "gated", "stacked"])
@pytest.mark.parametrize("with_residual", [True, False], ids=["add", "no-add"])
@pytest.mark.parametrize("tensor_cores", [False, True], ids=["cuda-cores", "tensor-cores"])
def test_triton_norm_gemv_matches_reference(rows, n, d_model, weights, with_residual, tensor_cores, monkeypatch):
    """The block boundary (residual add + RMSNorm) and the next projection (one weight, SwiGLU's gated
    pair, or q, k, v stacked: 32 and 16 rows then n) in one kernel, n and d_model not multiples of its
    blocks. fp32: the stream bitwise, the output within 1e-6 of the reference (summation order). bf16:
    the stream bitwise the interpreter's add (rounded toward zero, see round_toward_zero), the output
    what the kernel's roundings give on the exact products of the normed row (summed in fp64), to one
    rounding step of the largest output (an fp32 sum of squares in another order can flip one normed
    element: measured 0 or ≤ 5e-7); against the reference 2.5e-2 normwise (measured ≤ 2.1e-2 gated,
    ≤ 7.5e-3 not: the interpreter's roundings toward zero bias every one of the norm's and GEMV's
    roundings the same way). Both forms of the kernel: rows one at a time on CUDA cores, and a 16-row
    tile through tl.dot (in fp32 here: the interpreter's bf16 dot is wrong; the GPU test covers it)."""
    from hybridlm.kernels.decode_gemv import norm_gemv
    from hybridlm.kernels.decode_gemv import reference as gemv_reference
    from hybridlm.kernels.decode_gemv import triton as kernel

    monkeypatch.setattr(kernel, "TENSOR_CORES", tensor_cores)
    gen = torch.Generator().manual_seed(rows + n)
    h, residual = (torch.randn(rows, d_model, generator=gen) for _ in range(2))
    residual = residual if with_residual else None
    norm_weight = torch.rand(d_model, generator=gen) + 0.5
    shapes = {"gemv": (n,), "gated": (n, n), "stacked": (32, 16, n)}[weights]
    ws = [torch.randn(rows_, d_model, generator=gen) / d_model ** 0.5 for rows_ in shapes]

    def call(fn, h, residual, norm_weight, ws, **kw):
        w_up = ws[1] if weights == "gated" else None
        return fn(h, residual, norm_weight, 1e-5, ws[0], w_up, stacked=tuple(ws[1:]) if weights == "stacked" else None,
                  **kw)

    got, stream = call(norm_gemv, h, residual, norm_weight, ws, backend="triton")
    want, want_stream = call(gemv_reference.norm_gemv, h, residual, norm_weight, ws)
    assert got.shape == (rows, sum(shapes) if weights == "stacked" else n)
    assert torch.equal(stream, want_stream) and rel_err(got, want) <= 1e-6
    bf = [None if t is None else t.bfloat16() for t in (h, residual, norm_weight)]
    bf_ws = [t.bfloat16() for t in ws]
    got, stream = call(norm_gemv, *bf, bf_ws, backend="triton")
    want_stream = bf[0].float() if residual is None else round_toward_zero(bf[0].float() + bf[1].float())
    assert torch.equal(stream.float(), want_stream)
    rstd = torch.rsqrt(want_stream.pow(2).sum(-1, keepdim=True) / d_model + 1e-5)
    x = round_toward_zero(round_toward_zero(want_stream * rstd * bf[2].float())).double()
    products = [round_toward_zero((x @ t.double().T).float()) for t in bf_ws]
    if weights == "gated":
        exact = round_toward_zero(round_toward_zero(F.silu(products[0])) * products[1])
    else:
        exact = torch.cat(products, dim=-1)
    assert (got.float() - exact).abs().max() <= exact.abs().max() * 2**-8
    assert rel_err(got, call(gemv_reference.norm_gemv, *bf, bf_ws)[0]) <= 2.5e-2


@needs_triton
@pytest.mark.parametrize("rows,n,d_model", [(5, 40, 300), (16, 17, 513)])
@pytest.mark.parametrize("weights", ["gemv", "gated", "stacked"])
def test_triton_norm_gemv_split_k(rows, n, d_model, weights, monkeypatch):
    """Split-K (programs sharing a column block, each a slice of d_model; the last to arrive adds the
    fp32 partials in a fixed order and runs the epilogue): fp32 within 1e-6 of the reference, the
    stream bitwise, the same bits on a second call (deterministic), and the tickets back at zero.
    d_model 300 and 513 over BLOCK_K 128: 3 slices, the last short."""
    from hybridlm.kernels.decode_gemv import norm_gemv
    from hybridlm.kernels.decode_gemv import reference as gemv_reference
    from hybridlm.kernels.decode_gemv import triton as kernel

    monkeypatch.setattr(kernel, "SPLIT_K", 3)
    monkeypatch.setattr(kernel, "BLOCK_K", 128)
    gen = torch.Generator().manual_seed(rows + n)
    h, residual = (torch.randn(rows, d_model, generator=gen) for _ in range(2))
    norm_weight = torch.rand(d_model, generator=gen) + 0.5
    shapes = {"gemv": (n,), "gated": (n, n), "stacked": (32, 16, n)}[weights]
    ws = [torch.randn(rows_, d_model, generator=gen) / d_model ** 0.5 for rows_ in shapes]
    extra = dict(w_up=ws[1] if weights == "gated" else None,
                 stacked=tuple(ws[1:]) if weights == "stacked" else None)
    got, stream = norm_gemv(h, residual, norm_weight, 1e-5, ws[0], backend="triton", **extra)
    want, want_stream = gemv_reference.norm_gemv(h, residual, norm_weight, 1e-5, ws[0], **extra)
    assert torch.equal(stream, want_stream) and rel_err(got, want) <= 1e-6
    again, _ = norm_gemv(h, residual, norm_weight, 1e-5, ws[0], backend="triton", **extra)
    assert torch.equal(got, again)
    assert not counters(h.device, "decode_gemv").any()


@needs_triton
@pytest.mark.parametrize("weights", ["gemv", "gated", "stacked"])
@pytest.mark.parametrize("split_k", [1, 2])
def test_triton_norm_gemv_one_row_on_cuda_cores(weights, split_k, monkeypatch):
    """CUDA_CORES_AT_ONE_ROW: a single row takes the CUDA-core form with its own blocks (8 weight rows,
    128-wide tiles here; d_model 300 and n 40 not multiples of them), with and without split-K: fp32
    within 1e-6 of the reference, the stream bitwise; the tensor-core form still serves two rows."""
    from hybridlm.kernels.decode_gemv import norm_gemv
    from hybridlm.kernels.decode_gemv import reference as gemv_reference
    from hybridlm.kernels.decode_gemv import triton as kernel

    for knob, value in (("CUDA_CORES_AT_ONE_ROW", True), ("ONE_ROW_BLOCK_N", 8), ("ONE_ROW_BLOCK_K", 128),
                        ("SPLIT_K", split_k)):
        monkeypatch.setattr(kernel, knob, value)
    gen = torch.Generator().manual_seed(7)
    d_model = 300
    norm_weight = torch.rand(d_model, generator=gen) + 0.5
    shapes = {"gemv": (40,), "gated": (40, 40), "stacked": (32, 16, 40)}[weights]
    ws = [torch.randn(rows_, d_model, generator=gen) / d_model ** 0.5 for rows_ in shapes]
    extra = dict(w_up=ws[1] if weights == "gated" else None,
                 stacked=tuple(ws[1:]) if weights == "stacked" else None)
    for rows in (1, 2):
        h, residual = (torch.randn(rows, d_model, generator=gen) for _ in range(2))
        got, stream = norm_gemv(h, residual, norm_weight, 1e-5, ws[0], backend="triton", **extra)
        want, want_stream = gemv_reference.norm_gemv(h, residual, norm_weight, 1e-5, ws[0], **extra)
        assert torch.equal(stream, want_stream) and rel_err(got, want) <= 1e-6



@needs_triton
@pytest.mark.parametrize("form,split_k", [("one-row", 1), ("one-row", 2), ("tensor-cores", 1)])
def test_triton_norm_gemv_preloaded_tiles(form, split_k, monkeypatch):
    """PRELOAD_TILES loads each program's first weight tiles before the PDL wait and peels them off the
    walk: the same products added in the same order, so bitwise the output without them, in every form
    (one row on CUDA cores, with split-K, and the tensor-core tile; gated, plain and stacked weights;
    d_model 300 over 128-wide tiles: 1 or 2 peeled tiles followed by a short one, or all 3 of a program's
    tiles, the short one included, and 4 capped at a program's own), and within 1e-6 of the reference (fp32)."""
    from hybridlm.kernels.decode_gemv import norm_gemv
    from hybridlm.kernels.decode_gemv import reference as gemv_reference
    from hybridlm.kernels.decode_gemv import triton as kernel

    for knob, value in (("CUDA_CORES_AT_ONE_ROW", form == "one-row"), ("TENSOR_CORES", True),
                        ("ONE_ROW_BLOCK_N", 8), ("ONE_ROW_BLOCK_K", 128), ("BLOCK_K", 128), ("SPLIT_K", split_k)):
        monkeypatch.setattr(kernel, knob, value)
    gen = torch.Generator().manual_seed(11)
    d_model = 300
    h, residual = (torch.randn(1, d_model, generator=gen) for _ in range(2))
    norm_weight = torch.rand(d_model, generator=gen) + 0.5
    for shapes in ((40,), (40, 40), (32, 16, 40)):
        ws = [torch.randn(rows_, d_model, generator=gen) / d_model ** 0.5 for rows_ in shapes]
        extra = dict(w_up=ws[1] if len(ws) == 2 else None, stacked=tuple(ws[1:]) if len(ws) == 3 else None)
        monkeypatch.setattr(kernel, "PRELOAD_TILES", 0)
        plain, _ = norm_gemv(h, residual, norm_weight, 1e-5, ws[0], backend="triton", **extra)
        plain_gemv = kernel.gemv(h, ws[-1])
        want, want_stream = gemv_reference.norm_gemv(h, residual, norm_weight, 1e-5, ws[0], **extra)
        for tiles in (1, 2, 4):
            monkeypatch.setattr(kernel, "PRELOAD_TILES", tiles)
            got, stream = norm_gemv(h, residual, norm_weight, 1e-5, ws[0], backend="triton", **extra)
            assert torch.equal(got, plain) and torch.equal(stream, want_stream) and rel_err(got, want) <= 1e-6
            got_gemv = kernel.gemv(h, ws[-1])  # the plain form (split-K by PLAIN_SPLIT_K)
            assert torch.equal(got_gemv, plain_gemv) and rel_err(got_gemv, h @ ws[-1].T) <= 1e-6

@needs_triton
@pytest.mark.parametrize("family", ["hybrid-tiny", "mamba3-mimo-tiny", "transformer-tiny"])
def test_blocks_take_the_norm_into_their_first_projection_at_decode(family):
    """With the decode GEMV kernel, every block of a decode step (SwiGLU, Mamba-3, attention with
    its q, k, v stacked) takes the block boundary's residual add + RMSNorm into its first projection
    (one op, no separate norm op), and the step's logits agree with the separate norm's to fp32
    summation order."""
    model = family_model(family)
    use_kernel_backend(model, "triton")
    ids = torch.randint(0, model.spec.vocab_size, (2, 6))
    plain = Decoder(model, 2, 8)
    fused = Decoder(model, 2, 8)
    with torch.no_grad():
        plain.prefill(ids)
        fused.prefill(ids)
        token = ids[:, -1]
        mixers = [layer.mixer for layer in model.layers if hasattr(layer.mixer, "gemv_backend")]
        for m in mixers:
            m.gemv_backend = "reference"
        want = plain.step(token)
        for m in mixers:
            m.gemv_backend = "triton"
        with torch.profiler.profile() as prof:
            got = fused.step(token)
    names = [e.name for e in prof.events()]
    count = lambda *ops: sum(names.count(f"hybridlm::{op}") for op in ops)  # noqa: E731
    assert count("add_rms_norm_gemv", "rms_norm_gemv") == len(mixers)  # the first block has no residual
    assert count("add_rms_norm_fwd", "rms_norm_fwd") == len(model.layers) - len(mixers) + 1  # + the final norm
    assert count("gemv") == len(mixers)  # the named backend takes each block's output projection too
    assert rel_err(got, want) <= TOL[torch.float32]


@needs_triton
def test_plain_projections_take_the_gemv_kernel_when_asked(monkeypatch):
    """decode_gemv.linear is F.linear (cuBLAS) unless PLAIN_GEMVS is set or a backend is named; then a
    decode-sized input without autograd takes the kernel's plain form (fp32 within 1e-6), while more
    rows or autograd stay F.linear bitwise. The blocks' output projections (Mamba-3's out_proj,
    SwiGLU's w2, attention's wo) follow it through hybridlm.blocks.projection.project, which with
    autograd calls the module itself. PDL and PREFETCH_L2 (Hopper only) change nothing here."""
    from hybridlm.blocks.projection import project
    from hybridlm.kernels import decode_gemv
    from hybridlm.kernels.decode_gemv import triton as kernel

    gen = torch.Generator().manual_seed(3)
    w = torch.randn(40, 300, generator=gen) / 300 ** 0.5
    step, prefill = torch.randn(3, 1, 300, generator=gen), torch.randn(2, 9, 300, generator=gen)
    with torch.profiler.profile() as prof:
        assert torch.equal(decode_gemv.linear(step, w), F.linear(step, w))
    assert "hybridlm::gemv" not in {e.name for e in prof.events()}
    monkeypatch.setattr(decode_gemv, "PLAIN_GEMVS", True)  # then the registry's auto: the reference on a CPU
    assert torch.equal(decode_gemv.linear(step, w), F.linear(step, w))
    for knobs in ((False, False), (True, True)):
        monkeypatch.setattr(kernel, "PDL", knobs[0])
        monkeypatch.setattr(kernel, "PREFETCH_L2", knobs[1])
        with torch.profiler.profile() as prof:
            got = decode_gemv.linear(step, w, backend="triton")
        assert "hybridlm::gemv" in {e.name for e in prof.events()}
        assert got.shape == (3, 1, 40) and rel_err(got, F.linear(step, w)) <= 1e-6
    assert torch.equal(decode_gemv.linear(prefill, w, backend="triton"), F.linear(prefill, w))  # 18 rows: the GEMM
    layer = torch.nn.Linear(300, 40, bias=False)
    trained = project(layer, step)
    assert trained.grad_fn is not None and torch.equal(trained, layer(step))
    with torch.no_grad(), torch.profiler.profile() as prof:
        assert rel_err(project(layer, step, "triton"), layer(step)) <= 1e-6
    assert "hybridlm::gemv" in {e.name for e in prof.events()}
    with pytest.raises(ValueError, match="do not fit"):
        decode_gemv.linear(step, w.T)


@needs_triton
def test_split_k_target_programs(monkeypatch):
    """SPLIT_K_TARGET_PROGRAMS caps split-K at what the target needs: Mamba-3's in_proj of 1,084 one-row
    blocks takes no split at a target of 1,056 programs, out_proj's 256 blocks keep the configured 4; off (0)
    the configured split; never a program without a slice of d_model. The kernel at a target that leaves
    one split agrees with the split one to fp32 summation order."""
    from hybridlm.kernels.decode_gemv import triton as kernel

    assert kernel._split_k(4, 2048, 512, 1084) == (4, 512)
    monkeypatch.setattr(kernel, "SPLIT_K_TARGET_PROGRAMS", 1056)
    assert kernel._split_k(4, 2048, 512, 1084) == (1, 2048)
    assert kernel._split_k(4, 4096, 512, 256) == (4, 1024)
    assert kernel._split_k(4, 600, 512, 10) == (2, 512)  # 2 slices of 512 columns cover 600
    monkeypatch.setattr(kernel, "CUDA_CORES_AT_ONE_ROW", True)
    monkeypatch.setattr(kernel, "ONE_ROW_BLOCK_K", 128)
    gen = torch.Generator().manual_seed(11)
    w = torch.randn(40, 300, generator=gen) / 300 ** 0.5
    x = torch.randn(1, 300, generator=gen)
    monkeypatch.setattr(kernel, "SPLIT_K_TARGET_PROGRAMS", 1)  # 5 blocks of 8 already: no split
    whole = kernel.gemv(x, w)
    monkeypatch.setattr(kernel, "SPLIT_K_TARGET_PROGRAMS", 0)  # the configured split (3 slices of 128)
    split = kernel.gemv(x, w)
    assert rel_err(whole, F.linear(x, w)) <= 1e-6 and rel_err(split, F.linear(x, w)) <= 1e-6
    assert not torch.equal(whole, split)  # another summation order: the knob took effect


@needs_triton
def test_plain_in_proj_takes_the_gemv_kernel_when_asked(monkeypatch):
    """decode_gemv.PLAIN_IN_PROJ sends Mamba-3's in_proj at decode to the GEMV kernel's plain form (one
    ``gemv`` op a Mamba-3 layer more, beside out_proj's), and the step's logits agree with the module's
    in_proj to fp32 summation order; on the CPU's auto backend it is F.linear, bitwise the module."""
    from hybridlm.blocks.mamba3 import Mamba3
    from hybridlm.kernels import decode_gemv

    model = family_model("mamba3-mimo-tiny")
    mixers = [layer.mixer for layer in model.layers if isinstance(layer.mixer, Mamba3)]
    ids = torch.randint(0, model.spec.vocab_size, (2, 6), generator=torch.Generator().manual_seed(5))

    def step(plain_in_proj: bool, backend: str | None):
        monkeypatch.setattr(decode_gemv, "PLAIN_IN_PROJ", plain_in_proj)
        for m in mixers:
            m.gemv_backend = backend
        decoder = Decoder(model, 2, 8)
        with torch.no_grad():
            decoder.prefill(ids)
            with torch.profiler.profile() as prof:
                logits = decoder.step(ids[:, -1])
        return logits, [e.name for e in prof.events()].count("hybridlm::gemv")

    module_in_proj, _ = step(False, None)
    auto_in_proj, _ = step(True, None)
    assert torch.equal(auto_in_proj, module_in_proj)
    # a named backend also takes the block boundary into in_proj (normed_forward): keep it out here
    monkeypatch.setattr(Mamba3, "normed_forward", lambda self, *args, **kwargs: None)
    cublas, out_proj_only = step(False, "triton")
    kernel, both = step(True, "triton")
    assert (out_proj_only, both) == (len(mixers), 2 * len(mixers))
    assert rel_err(kernel, module_in_proj) <= TOL[torch.float32]
    assert rel_err(cublas, module_in_proj) <= TOL[torch.float32]


@needs_triton
def test_fused_decode_step_with_an_fp32_stream():
    """residual_in_fp32 with bf16 weights: the fused GEMVs take the fp32 stream and residual and the
    bf16 weights. The step's logits with the fused GEMVs and with the separate norms, each against
    the same weights in fp32 (the exact math): the fused path within the bf16 decode bound of
    test_bf16_decode_within_the_bf16_forward_bound, max(1e-2, 1.25 x the separate path's error)
    (measured 1.36e-2 against 1.15e-2: the interpreter rounds toward zero, see round_toward_zero)."""
    spec = get_preset("hybrid-tiny").model_copy(update={"residual_in_fp32": True})
    model = build_model(spec, dtype=torch.bfloat16, seed=0).eval()
    exact = build_model(spec, seed=0).eval()
    exact.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    use_kernel_backend(model, "triton")
    ids = torch.randint(0, spec.vocab_size, (2, 5), generator=torch.Generator().manual_seed(0))

    def step_logits(m, backend):
        for layer in m.layers:
            layer.mixer.gemv_backend = backend
        decoder = Decoder(m, 2, 8)
        decoder.prefill(ids[:, :-1])
        return decoder.step(ids[:, -1]).double()

    with torch.no_grad():
        truth = step_logits(exact, "reference")
        errors = {backend: rel_err(step_logits(model, backend), truth) for backend in ("reference", "triton")}
    assert errors["triton"] <= max(BF16_FLOOR, BF16_FACTOR * errors["reference"]), errors


def test_swiglu_gate_with_autograd_is_the_plain_ops():
    gate = torch.randn(4, 8, requires_grad=True)
    value = torch.randn(4, 8)
    out = silu_mul_(gate, value, backend="triton")  # autograd records: out of place, differentiable
    out.sum().backward()
    expected = torch.sigmoid(gate) * (1 + gate * (1 - torch.sigmoid(gate))) * value
    assert torch.allclose(gate.grad, expected.detach(), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="gate shape"):
        silu_mul_(torch.zeros(2, 3), torch.zeros(2, 4))


# (q shape, k heads, positions shape): a prefill without a cache (positions over L, every row),
# decode steps at far positions (one per row), packed prompts (one position per token); head_dim 24
# has a half of 12, so the pair axis is masked
ROPE_CASES = {"dense": ((2, 5, 4, 16), 2, (5,)), "decode": ((3, 1, 4, 24), 4, (3, 1)),
              "packed": ((1, 7, 6, 24), 2, (7,))}


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ROPE_CASES)
def test_triton_rope_matches_reference(case, dtype):
    """fp32: the same frequencies and angles; cos/sin and the products may differ by an ulp: 1e-6.
    bf16: rounded once from fp32, on the CPU toward zero by the interpreter (see above): two steps."""
    q_shape, k_heads, pos_shape = ROPE_CASES[case]
    g = torch.Generator().manual_seed(0)
    q = torch.randn(q_shape, generator=g).to(dtype)
    k = torch.randn(*q_shape[:-2], k_heads, q_shape[-1], generator=g).to(dtype)
    positions = torch.randint(0, 5000, pos_shape, generator=g)
    want_q, want_k = rope_reference.rope_qk(q, k, positions, 10000.0)
    got_q, got_k = rope_qk(q, k, positions, 10000.0, backend="triton")
    assert got_q.dtype == dtype and got_q.shape == q.shape and got_k.shape == k.shape
    for got, want in ((got_q, want_q), (got_k, want_k)):
        if dtype == torch.float32:
            assert rel_err(got, want) <= 1e-6
        else:
            assert within_steps(got, want, 2)
    assert rel_err(got_q.float(), q.float()) > 0.1  # it did rotate


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("theta", [None, 10000.0], ids=["nope", "rope"])
@pytest.mark.parametrize("B,L,Hq,Hk,D", [(3, 1, 4, 2, 16), (2, 3, 6, 3, 24)], ids=["step", "chunk"])
def test_triton_kv_append_matches_reference(B, L, Hq, Hk, D, theta, dtype):
    """A decode step (L = 1) and a 3-token chunk into caches whose rows hold 0, 5 and 9 tokens; head_dim
    24 masks the pair axis. The lengths advanced by L in place, every untouched cache position
    unchanged, v's rows bitwise; NoPE: k's rows and q bitwise; RoPE: q, k and k's cache rows as
    test_triton_rope_matches_reference (fp32 1e-6, bf16 two rounding steps on the CPU), k's cache
    rows bitwise the returned k."""
    from hybridlm.kernels.kv_append import append_kv
    from hybridlm.kernels.kv_append import reference as kv_reference

    g = torch.Generator().manual_seed(L)
    q = torch.randn(B, L, Hq, D, generator=g).to(dtype)
    k, v = (torch.randn(B, L, Hk, D, generator=g).to(dtype) for _ in range(2))
    before = torch.tensor([0, 5, 9][:B], dtype=torch.int32)
    lengths, want_lengths = before.clone(), before.clone()
    caches = [torch.randn(B, 16, Hk, D, generator=g).to(dtype) for _ in range(2)]
    want_caches = [c.clone() for c in caches]
    got_q, got_k = append_kv(q, k, v, *caches, lengths, theta, backend="triton")
    want_q, want_k = kv_reference.append_kv(q, k, v, *want_caches, want_lengths, theta)
    assert torch.equal(lengths, before + L) and torch.equal(want_lengths, before + L)
    written = torch.zeros(B, 16, dtype=torch.bool)
    for b in range(B):
        written[b, int(before[b]):int(before[b]) + L] = True
    assert torch.equal(caches[0][~written], want_caches[0][~written]) and torch.equal(caches[1], want_caches[1])
    assert torch.equal(caches[0][written], got_k.reshape(-1, Hk, D))
    for got, want in ((got_q, want_q), (got_k, want_k)):
        if theta is None:
            assert torch.equal(got, want)
        elif dtype == torch.float32:
            assert rel_err(got, want) <= 1e-6
        else:
            assert within_steps(got, want, 2)


def test_rope_with_autograd_is_the_reference_and_checks_shapes():
    q = torch.randn(2, 3, 4, 8, requires_grad=True)
    k = torch.randn(2, 3, 2, 8)
    positions = torch.arange(3)
    rq, rk = rope_qk(q, k, positions, 500.0, backend="triton")  # autograd records: the reference runs
    (rq.square().sum() + rk.sum()).backward()
    g = q.grad.clone()
    q.grad = None
    wq, wk = rope_reference.rope_qk(q, k, positions, 500.0)
    (wq.square().sum() + wk.sum()).backward()
    assert torch.equal(g, q.grad) and torch.equal(rq, wq) and torch.equal(rk, wk)
    with pytest.raises(ValueError, match="same leading shape"):
        rope_qk(q.detach(), torch.zeros(2, 4, 2, 8), positions, 500.0)


def test_reference_is_the_residual_block_bitwise():
    """The fused path's reference adds and norms with exactly the residual block's roundings."""
    model = family_model("hybrid-tiny", torch.bfloat16)
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        fused = model.features(ids, fused_norms=True)
        blocks = model.features(ids)
    assert torch.equal(fused, blocks)


def test_backend_choice_and_autograd_falls_back_to_the_reference():
    h = torch.randn(4, 16, requires_grad=True)
    w = torch.rand(16) + 0.5
    assert registry.choose("rmsnorm", "add_rms_norm", None, "cpu", None, (torch.float32,), 16) == "reference"
    out, _ = add_rms_norm(h, None, w, 1e-5, backend="triton")  # autograd records: the reference runs
    out.square().sum().backward()
    g = h.grad.clone()
    h.grad = None
    reference.add_rms_norm(h, None, w, 1e-5, torch.float32)[0].square().sum().backward()
    assert torch.equal(g, h.grad)
    with pytest.raises(ValueError, match="residual shape"):
        add_rms_norm(h.detach(), torch.zeros(4, 8), w, 1e-5)
    with pytest.raises(ValueError, match="weight shape"):
        add_rms_norm(h.detach(), None, torch.ones(8), 1e-5)


@needs_triton
@torch.no_grad()
def test_model_with_triton_kernels_matches_blocks_path():
    model = tiny_model()  # every block kind: Mamba-3 with conv and MIMO, windowed and QK-normed attention
    ids = torch.randint(0, 64, (2, 11))
    expected = model.features(ids)
    use_kernel_backend(model, "triton")
    assert rel_err(model.features(ids, fused_norms=True), expected) <= TOL[torch.float32]


# -- decode against the full forward --------------------------------------------------------------
@torch.no_grad()
def teacher_forced(model, prompts, fed, **decoder_kw):
    """Prefill ``prompts`` (list of 1-D), then feed ``fed`` (B, STEPS): logits (B, STEPS + 1, V)."""
    decoder = Decoder(model, len(prompts), max(len(p) for p in prompts) + fed.shape[1], **decoder_kw)
    logits = [decoder.prefill(prompts)]
    for t in range(fed.shape[1]):
        logits.append(decoder.step(fed[:, t]))
    return torch.stack(logits, 1)


@torch.no_grad()
def forward_logits(model, prompts, fed):
    """Each prompt + its fed tokens, full forward; the logits at the decoded positions."""
    return torch.stack([model(torch.cat([p, f])[None])[0, len(p) - 1:] for p, f in zip(prompts, fed)])


def family_inputs(seed=0, lengths=(23, 7), steps=STEPS, vocab=256):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g) for n in lengths], torch.randint(0, vocab, (len(lengths), steps),
                                                                                           generator=g)


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_and_64_steps_match_full_forward_fp32(family):
    model = family_model(family)
    prompts, fed = family_inputs()
    decoded = teacher_forced(model, prompts, fed)
    assert rel_err(decoded, forward_logits(model, prompts, fed)) <= TOL[torch.float32]


# bf16 on the CPU, measured 2026-12-03 (tiny presets, prompts of 23 and 7 tokens, 64 teacher-forced
# steps, norm-wise against the fp32 model on the same bf16-rounded weights): the bf16 full forward
# is itself 0.59e-2 (transformer-tiny), 1.41e-2 (hybrid), 1.33e-2 (MIMO), 1.82e-2 (mamba3) from
# it, and the bf16 decode 0.58, 1.41, 1.26, 1.74e-2: never more than 1.01x the forward's. Both
# paths round every block's output to bf16 (2^-8 relative, 3.9e-3) at comparable places; the
# errors add up over 12 blocks to a few roundoffs and do not grow with the steps (fp32 Mamba-3
# state; a step reads keys/values written once). Bound, as in the GPU tests: max(1e-2, 1.25 x the
# bf16 forward's own error).
BF16_FLOOR = 1e-2
BF16_FACTOR = 1.25


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_decode_within_the_bf16_forward_bound(family):
    model = family_model(family, torch.bfloat16)
    exact = family_model(family)  # the same (bf16-rounded) weights in fp32: the exact math
    exact.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    prompts, fed = family_inputs()
    truth = forward_logits(exact, prompts, fed).double()
    err_forward = rel_err(forward_logits(model, prompts, fed), truth)
    err_decode = rel_err(teacher_forced(model, prompts, fed), truth)
    assert err_decode <= max(BF16_FLOOR, BF16_FACTOR * err_forward), (err_decode, err_forward)


# -- chunked prefill ------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["hybrid-tiny", "mamba3-tiny", "transformer-tiny", "decode-test"])
@pytest.mark.parametrize("chunk", [1, 5, 16])
def test_chunked_prefill_equals_unchunked(family, chunk):
    """Chunks of 1 (every token a decode step), 5 (across the scan's chunks and the window, a
    packed chunk where a short prompt has no token left) and 16; dense and packed prompts; all the
    sequences in one forward and two at a time.
    ``decode-test`` is tests/test_decode.py's spec: short conv, MIMO, windowed RoPE and QK-norm."""
    model = tiny_model() if family == "decode-test" else family_model(family)
    vocab = model.spec.vocab_size
    prompts, fed = family_inputs(lengths=(19, 3, 12), steps=4, vocab=vocab)
    dense = torch.stack([prompts[0][:9], prompts[2][:9], prompts[0][5:14]])  # (3, 9)
    for inputs in (prompts, dense):
        whole = Decoder(model, 3, 24)
        want = [whole.prefill(inputs)] + [whole.step(fed[:, t]) for t in range(fed.shape[1])]
        # and in groups of 2 and 1 sequences (views of their cache rows: short conv, MIMO, KV caches)
        for chunked in (Decoder(model, 3, 24, prefill_chunk=chunk), Decoder(model, 3, 24, prefill_chunk=chunk,
                                                                          prefill_rows=2)):
            got = [chunked.prefill(inputs)] + [chunked.step(fed[:, t]) for t in range(fed.shape[1])]
            assert chunked.lengths == whole.lengths and chunked.cache.seqlen_offset == whole.cache.seqlen_offset
            assert rel_err(torch.stack(got), torch.stack(want)) <= TOL[torch.float32], type(inputs)


@torch.no_grad()
def test_a_large_prefill_is_chunked_by_default(monkeypatch):
    """Without ``prefill_chunk`` a batch whose prompts total more than PREFILL_TOKENS tokens is
    prefilled in chunks of PREFILL_TOKENS // batch tokens a prompt (a multiple of 64 from 64 up),
    so ``generate`` on long prompts at large batch keeps its activations bounded."""
    from hybridlm.builder.inference import decoder as decoder_module

    assert decoder_module.chunk_within(128, 16384, 131072) == 1024
    assert decoder_module.chunk_within(80, 16384, 131072) == 1600  # 1638 rounded down to a multiple of 64
    assert decoder_module.chunk_within(2, 100, 131072) == 100 and decoder_module.chunk_within(3, 100, 30) == 10
    model = family_model("hybrid-tiny")
    prompts, _ = family_inputs(steps=1)  # lengths 23 and 7
    with torch.no_grad():
        want = Decoder(model, 2, 32).prefill(prompts)
    monkeypatch.setattr(decoder_module, "PREFILL_TOKENS", 16)  # 30 tokens > 16: chunks of 8
    forwards = []
    real = type(model).features
    monkeypatch.setattr(type(model), "features", lambda self, *a, **k: forwards.append(1) or real(self, *a, **k))
    with torch.no_grad():
        got = Decoder(model, 2, 32).prefill(prompts)
    assert len(forwards) == 3  # tokens 0-7, 8-15, 16-22 of the long prompt
    assert rel_err(got, want) <= TOL[torch.float32]


def test_chunked_prefill_fp64_and_generate():
    model = tiny_model(torch.float64)
    prompts, _ = family_inputs(lengths=(13, 2, 8), vocab=64)
    whole = Decoder(model, 3, 16).prefill(prompts)
    assert rel_err(Decoder(model, 3, 16, prefill_chunk=4).prefill(prompts), whole) <= TOL[torch.float64]
    fp32 = tiny_model()
    assert all(torch.equal(a, b) for a, b in zip(fp32.generate(prompts, 5, temperature=0, prefill_chunk=3),
                                                 fp32.generate(prompts, 5, temperature=0)))


def test_decoder_argument_errors():
    model = tiny_model()
    with pytest.raises(ShapeError, match="prefill_chunk must be a positive number of tokens"):
        Decoder(model, 2, 8, prefill_chunk=0)
    with pytest.raises(ValueError, match="compile_step must be True, False or a torch.compile backend"):
        Decoder(model, 2, 8, compile_step=3)


# -- the compiled step ----------------------------------------------------------------------------
COMPILE_SPEC = """
version: 1
name: compile-test
vocab_size: 64
d_model: 32
blocks:
  M: {kind: mamba3, d_state: 8, headdim: 8, chunk_size: 4, out_norm: pregate_grouped}
  W: {kind: attention, n_heads: 4, n_kv_heads: 2, position: rope, window: 5}
  F: {kind: swiglu, hidden: 48}
pattern: "M F W F"
"""


@torch.no_grad()
def test_compiled_step_equals_eager_step():
    """``compile_step`` with dynamo and AOT autograd but no code generation (``aot_eager``): what
    dynamo traces of the step (a break at the Mamba-3 step kernel, the KV-cache path, SwiGLU)
    computes what the eager step computes (measured: bitwise). Inductor's code generation is
    checked on the GPU (tests/gpu/test_inference_e2e_gpu.py; on this CPU it took 25 s and gave
    1.4e-8). One block of each kind: every distinct layer is another trace (~5 s on one core)."""
    torch._dynamo.reset()
    model = build_model(spec_from_yaml(COMPILE_SPEC), seed=0).eval()
    if HAS_TRITON:  # the GPU's custom ops (the gate's mutates its input) through AOT's functionalization
        use_kernel_backend(model, "triton")
    prompts, fed = family_inputs(lengths=(7, 12), steps=3, vocab=64)
    eager = teacher_forced(model, prompts, fed)
    compiled = teacher_forced(model, prompts, fed, compile_step="aot_eager")
    assert rel_err(compiled, eager) <= 1e-6


# -- the benchmark's quick run --------------------------------------------------------------------
def load_benchmark(script: str, monkeypatch):
    """benchmarks/<script>.py as a module (named <script>_bench), with benchmarks/ on the path for the
    scripts it imports beside it (decode.py: prefill.py)."""
    benchmarks = Path(__file__).parents[1] / "benchmarks"
    monkeypatch.syspath_prepend(str(benchmarks))
    spec = importlib.util.spec_from_file_location(f"{script}_bench", benchmarks / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def bench(monkeypatch):
    """benchmarks/generate.py as a module."""
    return load_benchmark("generate", monkeypatch)


@needs_triton
def test_gemv_benchmark_runs_every_case_and_config(monkeypatch):
    """benchmarks/gemv.py's cases and sweep at tiny shapes on the CPU (the interpreted kernels, a
    wall-clock timer instead of CUDA graphs): every variant and config runs without error, so a
    GPU call does not die of a Python mistake. No timing is asserted."""
    gemv = load_benchmark("gemv", monkeypatch)
    monkeypatch.setattr(gemv, "DEVICE", "cpu")
    monkeypatch.setattr(gemv, "D_MODEL", 64)
    monkeypatch.setattr(gemv, "HIDDEN", 96)
    monkeypatch.setattr(gemv, "L2_BYTES", 4096)
    monkeypatch.setattr(gemv, "SWEEP_GRID", [(False, 16, 128, 4, 3, 1), (False, 32, 64, 4, 2, 2)])
    monkeypatch.setattr(gemv, "graph_ms", lambda call, reps: [call(i) for i in range(reps)] and 1.0)
    variants = [(case, variant) for case, variant, _, call in gemv.cases(3, 80) if gemv.graph_ms(call, 2)]
    assert variants == [("in_proj", "norm + cuBLAS"), ("in_proj", "norm_gemv"), ("swiglu", "norm + 2 cuBLAS + gate"),
                        ("swiglu", "norm + silu_mul_gemv"), ("swiglu", "norm_gemv"), ("qkv", "norm + 3 cuBLAS"),
                        ("qkv", "norm_gemv"), ("plain", "cuBLAS"), ("plain", "gemv")]
    rows = gemv.sweep(2, 1e12, 2, 80)
    assert len(rows) == 8 and not any("error" in row for row in rows)  # 4 cases x 2 configs
    assert len(gemv.sweep(2, 1e12, 2, 80, only={"plain"})) == 2
    one_row = gemv.sweep(1, 1e12, 2, 80, None, gemv.ONE_ROW_KNOBS, [(True, 8, 128, 4, 1), (True, 4, 256, 4, 2)])
    assert len(one_row) == 8 and not any("error" in row for row in one_row)


def test_decode_benchmark_splits_backends_outside_brackets(monkeypatch):
    """benchmarks/decode.py --backends: commas inside a backend's brackets separate its knobs, so
    ``cute[cute_max_rows=8,cute_min_blocks=2]`` is one column with two tuning changes."""
    decode = load_benchmark("decode", monkeypatch)
    assert decode.split_backends("cute,cute[cute_max_rows=8,cute_min_blocks=2],triton") == [
        "cute", "cute[cute_max_rows=8,cute_min_blocks=2]", "triton"]
    assert decode.backend_and_tuning("cute[cute_max_rows=8,cute_min_blocks=2]") == (
        "cute", {"cute_max_rows": 8, "cute_min_blocks": 2})


def test_decode_profile_helpers(monkeypatch):
    """benchmarks/decode_profile.py: the GPU busy time is the union of kernel intervals (overlaps
    counted once, gaps not). decode_gemv.knobs.set_knobs sets the kernel's and the package's knobs
    by name (booleans from 0/1), puts them back before the next set, and refuses a name that is not
    one."""
    prof = load_benchmark("decode_profile", monkeypatch)
    assert prof.busy_time([(5, 6), (0, 2), (1, 3), (2.5, 2.7)]) == 4.0
    from hybridlm.kernels import decode_gemv
    from hybridlm.kernels.decode_gemv import triton as kernel
    from hybridlm.kernels.decode_gemv.knobs import set_knobs

    before = kernel.CUDA_CORES_AT_ONE_ROW, kernel.ONE_ROW_BLOCK_N, decode_gemv.PLAIN_GEMVS
    knobs, saved = set_knobs(f"CUDA_CORES_AT_ONE_ROW={1 - before[0]},ONE_ROW_BLOCK_N=4,PLAIN_GEMVS={1 - before[2]}")
    try:
        assert knobs == {"CUDA_CORES_AT_ONE_ROW": not before[0], "ONE_ROW_BLOCK_N": 4, "PLAIN_GEMVS": not before[2]}
        assert (kernel.CUDA_CORES_AT_ONE_ROW, kernel.ONE_ROW_BLOCK_N, decode_gemv.PLAIN_GEMVS) == (
            not before[0], 4, not before[2])
    finally:
        assert set_knobs("", saved)[0] == {}  # the next set starts from the defaults
    assert (kernel.CUDA_CORES_AT_ONE_ROW, kernel.ONE_ROW_BLOCK_N, decode_gemv.PLAIN_GEMVS) == before
    from hybridlm.kernels.decode_attention import triton as attention_kernel

    knobs, saved = set_knobs("ATTENTION_PDL=1")  # the other decode kernels' PDL switches, by alias
    assert knobs == {"ATTENTION_PDL": True} and attention_kernel.PDL is True
    set_knobs("", saved)
    assert attention_kernel.PDL is False
    for bad in ("torch=1", "PDL"):
        with pytest.raises(ValueError, match="PREFETCH_L2"):
            set_knobs(bad)


def test_generate_benchmark_quick(bench, tmp_path, capsys):
    out = tmp_path / "gen.json"
    bench.main(["--quick", "--contexts", "16", "--a-new-tokens", "4", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    ids = {r["id"] for r in rows}
    assert {f"a:{m}:fused" for m in bench.QUICK_MODELS} <= ids
    # the Transformer's fit batch (6, capped) and the state models' batch (4, which fits it) for every model
    assert {f"b16:{m}:{b}:fused" for m in bench.QUICK_MODELS for b in (4, 6)} <= ids
    for r in rows:
        assert "error" not in r, r
        assert r["generated_tokens_per_s"] == pytest.approx(r["batch"] * r["new_tokens"] / r["decode_s"])
        assert r["ratio_to_bound"] == pytest.approx(r["ms_per_step"] / r["weight_read_bound_ms"])
    table = capsys.readouterr().out
    assert "| hybrid-tiny | fused | 24 | 4 |" in table and "| 16 | transformer-tiny | fused | 6 |" in table
    bench.main(["--quick", "--only", "a:mamba3-tiny:*", "--a-new-tokens", "2", "--json", str(out)])
    assert len(json.loads(out.read_text())["rows"]) == len(rows)  # merged by id, not appended


def test_generate_benchmark_writes_each_row_as_it_comes(bench, monkeypatch, tmp_path):
    """A run stopped by its call's time limit keeps what it measured: the JSON holds every finished row
    before the next case starts (here the third case's measurement stops the run)."""
    out = tmp_path / "gen.json"
    measured = []

    def measure(model, case, token_budget):
        if len(measured) == 2:
            raise KeyboardInterrupt  # the call's limit
        measured.append(case.id)
        return {"ms_per_step": 1.0, "prefill_s": 0.1, "decode_s": 0.2}

    monkeypatch.setattr(bench, "measure", measure)
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--quick", "--only", "a:*", "--json", str(out)])
    assert [r["id"] for r in json.loads(out.read_text())["rows"]] == measured


def test_sampled_decode_is_exact_for_a_step_cost_affine_in_context(bench):
    """The Transformer's step cost grows by one token's KV read a step: affine in the context. The
    sampled decode's interpolation then gives the sum of every step's cost exactly."""
    starts = bench.sample_starts(16384, 16384, 5, steps=32)
    assert starts == [16384, 20472, 24560, 28648, 32736]  # evenly, the last window inside the generation
    cost = lambda context: 0.25 + 3e-4 * context  # noqa: E731  (ms)
    points = [(x + 15.5, cost(x + 15.5)) for x in starts]
    exact = sum(cost(16384 + t) for t in range(16384)) / 1e3
    assert bench.interpolated_decode_s(points, 16384, 16384) == pytest.approx(exact, rel=1e-12)
    assert bench.interpolated_decode_s([(10.0, 2.0)], 8, 100) == pytest.approx(0.2)  # a state model: flat


def test_generate_benchmark_sampled_decode_quick(bench, monkeypatch, tmp_path):
    """Three contexts, the cache continued from one to the next (one prefill a row, two extends)."""
    monkeypatch.setattr(bench, "SAMPLE_STEPS", 4)
    calls = collections.Counter()
    for name in ("prefill", "extend"):
        def counted(self, ids, _real=getattr(Decoder, name), _name=name):
            calls[_name, ids.shape[1]] += 1
            return _real(self, ids)
        monkeypatch.setattr(Decoder, name, counted)
    out = tmp_path / "gen.json"
    bench.main(["--quick", "--only", "b16:transformer-tiny:*", "--contexts", "16", "--b-samples", "3",
                "--json", str(out)])
    # two rows (batches 4 and 6): the warm-up prefill (2 chunks of 8), the prompt's, 20 -> 22 and 26 -> 28 tokens
    assert calls == {("prefill", 16): 4, ("extend", 2): 4}, calls
    rows = json.loads(out.read_text())["rows"]
    assert rows and all(r["id"].endswith(":s3") and "error" not in r for r in rows)
    for r in rows:
        contexts = [x for x, _ in r["decode_sampled_ms_per_step"]]
        assert contexts == [16 + 1.5, 22 + 1.5, 28 + 1.5]  # sample_starts(16, 16, 3, 4)
        assert r["generated_tokens_per_s"] == pytest.approx(r["batch"] * 16 / r["decode_s"])


def test_generate_benchmark_skips_the_rows_it_has(bench, monkeypatch, tmp_path):
    """--skip-measured: a second call measures only what the first did not (or measured with an error)."""
    out = tmp_path / "gen.json"
    measured = []

    def measure(model, case, token_budget):
        measured.append(case.id)
        if case.id == "a:mamba3-tiny:fused":
            raise RuntimeError("simulated")
        return {"ms_per_step": 1.0, "prefill_s": 0.1, "decode_s": 0.2}

    monkeypatch.setattr(bench, "measure", measure)
    bench.main(["--quick", "--only", "a:transformer-tiny:*,a:mamba3-tiny:*", "--json", str(out)])
    assert measured == ["a:transformer-tiny:fused", "a:mamba3-tiny:fused"]  # the Transformer first
    measured.clear()
    bench.main(["--quick", "--only", "a:*", "--json", str(out), "--skip-measured"])
    assert measured == ["a:hybrid-tiny:fused", "a:mamba3-tiny:fused", "a:mamba3-mimo-tiny:fused"]
    with pytest.raises(SystemExit):
        bench.parse_args(["--quick", "--skip-measured"])


def test_prefill_shrinks_after_out_of_memory(monkeypatch):
    """A prefill forward that does not fit beside a large cache is retried smaller, with a warning:
    the token chunk halved while above ROWS_BEFORE_TOKENS_BELOW, then the rows (sequences a forward,
    through views of their cache rows), then the tokens again, down to one token of one sequence; the
    logits, the cache and the next steps are the one-forward prefill's (only summation order changes).
    The H200 case: at batch 2,664 and 512-token prompts the budget gave 49 tokens a row, and each
    Mamba-3 layer's fp32 states of every row (about 5 GiB each way at the 1.5B presets) left no token
    chunk that fit."""
    model = family_model("hybrid-tiny")
    vocab = model.spec.vocab_size
    prompts, fed = family_inputs(lengths=(19, 3, 12, 7), steps=3, vocab=vocab)
    monkeypatch.setattr(decoder_module, "PREFILL_TOKENS", 40)  # 41 tokens in all: chunks of 10 a row
    monkeypatch.setattr(decoder_module, "ROWS_BEFORE_TOKENS_BELOW", 6)
    real = type(model).features
    forwards = []

    def features_limited(self, ids_, cu_seqlens=None, *args, **kwargs):  # "out of memory" above `limit`
        rows = ids_.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
        tokens = ids_.shape[1] if cu_seqlens is None else int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        forwards.append((rows, tokens))
        if rows * tokens > limit:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, ids_, cu_seqlens, *args, **kwargs)

    want_decoder = Decoder(model, 4, 32)
    want = [want_decoder.prefill(prompts)] + [want_decoder.step(fed[:, t]) for t in range(fed.shape[1])]
    dense = torch.stack([p[:3] for p in prompts])
    want_dense = Decoder(model, 4, 32).prefill(dense)
    limit = 3
    monkeypatch.setattr(type(model), "features", features_limited)
    decoder = Decoder(model, 4, 32)
    with pytest.warns(RuntimeWarning, match="ran out of memory") as caught:
        got = [decoder.prefill(prompts)]
    # 4 x 10 -> 4 x 5 (tokens, above 6) -> 2 rows x 5 (the chunk is pinned) -> 1 row x 5 -> 1 x 2, which fits
    assert [str(w.message).split(";")[1].strip() for w in caught] == [
        "prefilling 5 tokens a row at a time (set prefill_chunk to choose)",
        "prefilling 2 sequences at a time (set prefill_rows to choose)",
        "prefilling 1 sequences at a time (set prefill_rows to choose)",
        "prefilling 2 tokens a row at a time (set prefill_chunk to choose)"]
    assert (decoder.prefill_rows, decoder.prefill_chunk) == (1, 2) and forwards[-1] == (1, 1)
    monkeypatch.setattr(type(model), "features", real)
    got += [decoder.step(fed[:, t]) for t in range(fed.shape[1])]
    assert decoder.lengths == want_decoder.lengths and decoder.cache.seqlen_offset == want_decoder.cache.seqlen_offset
    assert rel_err(torch.stack(got), torch.stack(want)) <= TOL[torch.float32]
    grouped = Decoder(model, 4, 32, prefill_rows=3)  # groups of 3 and 1, dense prompts
    assert rel_err(grouped.prefill(dense), want_dense) <= TOL[torch.float32]
    limit = 0  # not even one token of one sequence fits: the error comes through
    monkeypatch.setattr(type(model), "features", features_limited)
    with pytest.raises(torch.OutOfMemoryError), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        decoder.prefill(prompts)
    assert (decoder.prefill_rows, decoder.prefill_chunk) == (1, 1)
    with pytest.raises(ShapeError, match="prefill_rows must be a positive number of sequences"):
        Decoder(model, 2, 8, prefill_rows=0)


@needs_triton
def test_fused_step_has_one_op_per_block_boundary(bench):
    """The op count of one bf16 step of mamba3-tiny (6 (M F) pairs) with the GPU's kernels: every
    block boundary is inside the next block's first projection (Mamba-3's in_proj, SwiGLU's w1, w3
    and gate: one GEMV op each), the final norm one op, and no norm or gate op is left outside them.
    Before issue 21 (``unfused``): 179 ops; with the fused norms and gates 57; with the SwiGLU GEMV
    45; with the norms inside the GEMVs 33 (per (M F) pair: two GEMV ops, the step, two plain GEMVs:
    the kernel's with the backend named, cuBLAS's by default)."""
    model = build_model(get_preset("mamba3-tiny"), dtype=torch.bfloat16, seed=0).eval()
    use_kernel_backend(model, "triton")
    fused = bench.count_step_ops(model, "fused")
    unfused = bench.count_step_ops(model, "unfused")
    blocks = len(model.layers)
    ops = fused["by_name"]
    assert ops["hybridlm::rms_norm_gemv"] == 1  # the first block's in_proj (no residual yet)
    assert ops["hybridlm::add_rms_norm_gemv"] == blocks - 1
    assert ops["hybridlm::add_rms_norm_fwd"] == 1 and "hybridlm::rms_norm_fwd" not in ops  # the final norm
    assert ops["hybridlm::gemv"] == blocks and ops["aten::linear"] == 1  # out_proj and w2 a pair; the head
    assert not {"hybridlm::silu_mul_", "hybridlm::silu_mul_gemv"} & set(ops)
    assert not {"aten::rsqrt", "aten::pow", "aten::mean", "aten::silu", "aten::silu_"} & set(ops)
    assert (unfused["ops"], fused["ops"]) == (179, 33)


@needs_triton
def test_fused_transformer_step_rotates_q_and_k_in_one_op(bench):
    """The op count of one bf16 step of transformer-tiny (6 (A F) pairs) with the GPU's kernels: every
    block boundary is inside the next block's first projection (q, k and v stacked in one GEMV op;
    SwiGLU's w1, w3 and gate in another), and RoPE and the KV-cache write are one op a layer (the
    angles, cos/sin, the halves and the cats were ≈ 28, then the positions, two scatters, the new
    lengths and their copy 7 more); what is left per attention layer is SDPA's mask over the cache
    (FA4 reads the lengths instead). Unfused 383 ops (437 before the reference RoPE's cos/sin table
    became one op, 443 before the reference cache write advanced the lengths in place), fused 75 (321
    before RoPE, 153 before the SwiGLU GEMV, 141 before the norms went into the GEMVs, 135 before the
    cache write, 99 before q, k and v, 81 before the lengths advanced in place)."""
    model = build_model(get_preset("transformer-tiny"), dtype=torch.bfloat16, seed=0).eval()
    use_kernel_backend(model, "triton")
    fused = bench.count_step_ops(model, "fused")
    unfused = bench.count_step_ops(model, "unfused")
    ops = fused["by_name"]
    attention_layers = sum(isinstance(m, Attention) for m in model.modules())
    assert ops["hybridlm::append_kv"] == attention_layers == 6
    assert not {"aten::cos", "aten::sin", "aten::cat", "aten::neg", "aten::scatter_", "hybridlm::rope_qk"} & set(ops)
    assert ops["hybridlm::rms_norm_gemv"] + ops["hybridlm::add_rms_norm_gemv"] == 12  # every block's first GEMV
    assert ops["hybridlm::gemv"] == 2 * attention_layers and ops["aten::linear"] == 1  # wo and w2; the head
    assert "aten::copy_" not in ops  # the lengths advance inside the cache kernel
    assert (unfused["ops"], fused["ops"]) == (383, 75)
