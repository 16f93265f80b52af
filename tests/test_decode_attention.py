"""The decode step's attention over the KV cache (hybridlm/kernels/decode_attention/): the Triton
split-KV kernel (interpreted on the CPU) against the reference, and the reference against SDPA's
cached path; the kernel as the attention backend ``triton`` in a whole decode step."""
import importlib.util

import pytest
import torch

from hybridlm import build_model, get_preset
from hybridlm.blocks import Attention
from hybridlm.builder import Decoder
from hybridlm.kernels.attention import cached_attention, resolve_decode_backend, sdpa_cached_attention
from hybridlm.kernels.decode_attention import reference
from hybridlm.kernels.tickets import counters
from hybridlm.testing import rel_err

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="needs triton (TRITON_INTERPRET=1 on the CPU)")

# (batch, q heads, kv heads, head_dim, cache positions, lengths, window)
CASES = [(1, 4, 1, 32, 300, [290], None),  # one (row, kv head): three slices, the last short
         (3, 8, 2, 16, 300, [1, 150, 300], None),  # a row of one key: its later slices are empty
         (2, 6, 3, 32, 200, [200, 77], 50),  # a window inside the cache; groups of 2 heads
         (2, 4, 4, 64, 40, [40, 3], None)]  # no GQA; a cache shorter than a slice


def inputs(case, dtype, seed=0):
    B, H, Hkv, D, T, lengths, window = case
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, 1, H, D, generator=g).to(dtype)
    k, v = (torch.randn(B, T, Hkv, D, generator=g).to(dtype) for _ in range(2))
    return q, k, v, torch.tensor(lengths, dtype=torch.int32), window


@pytest.mark.parametrize("case", CASES)
def test_reference_matches_sdpa_cached_path(case):
    q, k, v, lengths, window = inputs(case, torch.float64)
    want = sdpa_cached_attention(q, k, v, lengths, window=window)
    assert rel_err(reference.decode_attention(q, k, v, lengths, window=window), want) <= 1e-12


@needs_triton
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_decode_attention_matches_reference(case, dtype, monkeypatch):
    """fp32: within 1e-6 of the fp64 reference (summation order and the slices' exp2 rescaling);
    bf16 within 1e-2 (the probabilities rounded to bf16 for the second product, as FlashAttention
    does: one rounding step, 2^-8, on each weight, and the output's own rounding). Slices of 64
    positions, so every case crosses slices; a second call gives the same bits and leaves the
    tickets at zero."""
    from hybridlm.kernels.decode_attention import triton as kernel

    monkeypatch.setattr(kernel, "MIN_SLICE", 64)
    q, k, v, lengths, window = inputs(case, dtype)
    got = kernel.decode_attention(q, k, v, lengths, window=window)
    want = reference.decode_attention(*(t.double() for t in (q, k, v)), lengths, window=window)
    assert got.dtype == dtype and got.shape == q.shape
    assert rel_err(got, want) <= (1e-6 if dtype == torch.float32 else 1e-2)
    assert torch.equal(kernel.decode_attention(q, k, v, lengths, window=window), got)
    assert not counters(q.device, "decode_attention").any()
    assert kernel.slices(*case[:1], case[2], case[4], q.device)[1] >= 1


def test_slices_fill_the_machine_within_bounds():
    from hybridlm.kernels.decode_attention import triton as kernel

    kernel._SM_COUNT[0] = 132
    cuda = torch.device("cuda", 0)
    assert kernel.slices(1, 4, 2304, cuda) == (128, 18)  # 264 programs wanted: slices of the least length
    assert kernel.slices(80, 4, 32768, cuda) == (32768, 1)  # 320 (row, kv head) pairs: one slice each
    assert kernel.slices(1, 4, 131072, cuda) == (2048, 64)


def test_decode_steps_take_the_decode_op(monkeypatch):
    """cached_attention sends a dense one-token step to the op ``decode`` (the registry's choice;
    on a CPU SDPA's cached path), anything else to ``cached``; an unknown head_dim for the kernel
    is a clear reason, not a trace."""
    from hybridlm.kernels.decode_attention import triton as kernel

    q, k, v, lengths, window = inputs(CASES[1], torch.float32)
    assert resolve_decode_backend(None, q, k) == "sdpa"
    assert torch.equal(cached_attention(q, k, v, lengths), sdpa_cached_attention(q, k, v, lengths))
    assert "head_dim 48" in kernel.unsupported_reason(torch.device("cuda"), torch.bfloat16, torch.bfloat16, 48)
    assert "dtypes" in kernel.unsupported_reason(torch.device("cuda"), torch.float64, torch.float64, 64)


@needs_triton
def test_transformer_decode_with_the_triton_attention_backend():
    """transformer-tiny, fp32: prefill then 8 steps with attention's backend ``triton`` (decode steps
    through the kernel, the prefill through its fallback) against SDPA: logits within 1e-5."""
    model = build_model(get_preset("transformer-tiny"), seed=0).eval()
    ids = torch.randint(0, model.spec.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))

    def run(backend):
        for m in model.modules():
            if isinstance(m, Attention):
                m.backend = backend
        decoder = Decoder(model, 2, 64)
        with torch.no_grad():
            logits = [decoder.prefill(ids)]
            for t in range(8):
                logits.append(decoder.step(ids[:, t]))
        return torch.stack(logits)

    with torch.profiler.profile() as prof:
        got = run("triton")
    assert sum(e.name == "hybridlm::decode_attention" for e in prof.events()) == 8 * sum(
        isinstance(m, Attention) for m in model.modules())
    assert rel_err(got, run("sdpa")) <= 1e-5
