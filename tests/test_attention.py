"""Attention: against an explicit softmax implementation, packing and the KV cache."""
import math

import pytest
import torch

from hybridlm.blocks import Attention
from hybridlm.errors import ShapeError
from hybridlm.testing import rel_err


def naive_attention(m: Attention, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
    """Written independently: HF-style rotate_half RoPE, repeated KV heads, explicit softmax, float64."""
    x = x.double()
    B, L, _ = x.shape
    H, Hkv, D = m.n_heads, m.n_kv_heads, m.head_dim
    q = (x @ m.wq.weight.double().T).view(B, L, H, D)
    k = (x @ m.wk.weight.double().T).view(B, L, Hkv, D)
    v = (x @ m.wv.weight.double().T).view(B, L, Hkv, D)
    if m.qk_norm:
        q = q / q.pow(2).mean(-1, keepdim=True).add(m.q_norm.eps).sqrt() * m.q_norm.weight.double()
        k = k / k.pow(2).mean(-1, keepdim=True).add(m.k_norm.eps).sqrt() * m.k_norm.weight.double()
    if m.position == "rope":
        pos = torch.arange(L, dtype=torch.float64) if positions is None else positions.double()
        freqs = pos[:, None] / (m.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D))[None]
        cos = torch.cat([freqs.cos(), freqs.cos()], -1)[None, :, None]
        sin = torch.cat([freqs.sin(), freqs.sin()], -1)[None, :, None]

        def rotate_half(t):
            return torch.cat([-t[..., D // 2:], t[..., : D // 2]], -1)

        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
    k = k.repeat_interleave(H // Hkv, dim=2)
    v = v.repeat_interleave(H // Hkv, dim=2)
    scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(D)
    i = torch.arange(L)[:, None]
    j = torch.arange(L)[None, :]
    keep = j <= i
    if m.window:
        keep &= (i - j) < m.window
    scores = scores.masked_fill(~keep, float("-inf"))
    out = torch.einsum("bhij,bjhd->bihd", scores.softmax(-1), v).reshape(B, L, H * D)
    return out @ m.wo.weight.double().T


CASES = {
    "mha-rope": dict(n_heads=4),
    "gqa-nope": dict(n_heads=4, n_kv_heads=2, position="nope"),
    "mqa-rope-window": dict(n_heads=4, n_kv_heads=1, window=5),
    "gqa-qknorm-headdim": dict(n_heads=2, n_kv_heads=1, head_dim=12, qk_norm=True, rope_theta=500.0),
}


def make(case, **extra):
    torch.manual_seed(0)
    m = Attention(32, **{**CASES[case], **extra})
    if m.qk_norm:
        with torch.no_grad():
            m.q_norm.weight.uniform_(0.5, 1.5)
            m.k_norm.weight.uniform_(0.5, 1.5)
    return m


@pytest.mark.parametrize("case", list(CASES))
def test_matches_explicit_softmax(case):
    m = make(case)
    x = torch.randn(2, 19, 32)
    assert rel_err(m(x), naive_attention(m, x)) <= 1e-5


@pytest.mark.parametrize("case", list(CASES))
def test_packed_equals_separate(case):
    m = make(case)
    lengths = [5, 11, 1, 8]
    x = torch.randn(1, sum(lengths), 32)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    packed = m(x, cu_seqlens=cu)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        assert rel_err(packed[:, s:e], m(x[:, s:e])) <= 1e-5


@pytest.mark.parametrize("case", list(CASES))
def test_kv_cache_prefill_then_decode(case):
    m = make(case)
    x = torch.randn(2, 17, 32)
    whole = m(x)
    cache = m.allocate_cache(2, 20)
    outs = [m(x[:, :6], cache=cache), m(x[:, 6:10], cache=cache)]
    outs += [m(x[:, t: t + 1], cache=cache) for t in range(10, 17)]
    assert cache.lengths.tolist() == [17, 17] and cache.max_filled == 17
    assert rel_err(torch.cat(outs, 1), whole) <= 1e-5


def test_cache_overflow_and_packed_cache_errors():
    m = make("gqa-nope")
    cache = m.allocate_cache(1, 4)
    with pytest.raises(ShapeError, match="Allocate a larger cache"):
        m(torch.randn(1, 5, 32), cache=cache)
    with pytest.raises(ShapeError, match=r"batch 1; got 2 sequences \(cu_seqlens\)"):
        m(torch.randn(1, 4, 32), cu_seqlens=torch.tensor([0, 2, 4]), cache=m.allocate_cache(1, 4))


def test_state_bytes_respects_window():
    m = make("mqa-rope-window")
    assert m.state_bytes(1000, torch.bfloat16) == 2 * 5 * 1 * 8 * 2
    assert make("mha-rope").state_bytes(1000, torch.bfloat16) == 2 * 1000 * 4 * 8 * 2


def test_attention_backend_choice_on_cpu(monkeypatch):
    from hybridlm.errors import BackendUnavailable
    from hybridlm.kernels.attention import resolve_attention_backend

    q = k = torch.randn(1, 4, 2, 8)
    monkeypatch.delenv("HYBRIDLM_ATTENTION", raising=False)
    assert resolve_attention_backend(None, q, k) == "sdpa"
    with pytest.raises(BackendUnavailable, match="FA4 needs CUDA.*'sdpa'"):
        resolve_attention_backend("fa4", q, k)
    monkeypatch.setenv("HYBRIDLM_ATTENTION", "fa4")
    with pytest.raises(BackendUnavailable, match="FA4 needs CUDA"):
        make("gqa-nope")(torch.randn(1, 4, 32))
    assert resolve_attention_backend("sdpa", q, k) == "sdpa"  # the argument (spec field) wins over the variable
    monkeypatch.setenv("HYBRIDLM_ATTENTION", "flash")
    with pytest.raises(BackendUnavailable, match="unknown attention backend 'flash' .*HYBRIDLM_ATTENTION"):
        resolve_attention_backend(None, q, k)


def test_attention_backend_spec_field():
    from hybridlm.builder import build_model
    from hybridlm.errors import SpecError
    from hybridlm.layouts import spec_from_yaml as load_spec_text

    text = """
version: 1
name: fa
d_model: 32
vocab_size: 64
pattern: "A"
blocks:
  A: {kind: attention, n_heads: 4, backend: %s}
"""
    model = build_model(load_spec_text(text % "sdpa"))
    assert [m.backend for m in model.modules() if isinstance(m, Attention)] == ["sdpa"]
    with pytest.raises(SpecError, match="backend"):
        load_spec_text(text % "flash")


@pytest.mark.parametrize("case", list(CASES))
def test_kv_cache_per_row_lengths(case):
    """Rows of different lengths: a packed prefill, decode steps, a dense chunk and a packed chunk
    continue every row exactly as the whole sequence without a cache."""
    m = make(case)
    prompt, later = [5, 11, 1, 8], [2, 1, 3, 1]
    seqs = [torch.randn(1, n + 3 + 2 + k, 32) for n, k in zip(prompt, later)]
    cache = m.allocate_cache(4, 24)

    def pack(pieces):
        cu = torch.tensor([0] + torch.tensor([p.shape[1] for p in pieces]).cumsum(0).tolist(), dtype=torch.int32)
        return torch.cat(pieces, 1), cu

    starts = [0, 0, 0, 0]
    got = [[] for _ in seqs]

    def take(lengths):
        pieces = [s[:, a: a + n] for s, a, n in zip(seqs, starts, lengths)]
        for i, n in enumerate(lengths):
            starts[i] += n
        return pieces

    x, cu = pack(take(prompt))
    out = m(x, cu_seqlens=cu, cache=cache)
    for i, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        got[i].append(out[:, s:e])
    for _ in range(3):  # decode steps: one token per row
        out = m(torch.cat(take([1] * 4)), cache=cache)
        for i in range(4):
            got[i].append(out[i: i + 1])
    out = m(torch.cat(take([2] * 4)), cache=cache)  # a dense chunk on rows of different lengths
    for i in range(4):
        got[i].append(out[i: i + 1])
    x, cu = pack(take(later))  # a packed chunk on a filled cache
    out = m(x, cu_seqlens=cu, cache=cache)
    for i, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        got[i].append(out[:, s:e])
    assert cache.lengths.tolist() == [s.shape[1] for s in seqs]
    for i, s in enumerate(seqs):
        assert rel_err(torch.cat(got[i], 1), m(s)) <= 1e-5, i


def test_cached_attention_backend_choice_on_cpu(monkeypatch):
    """Reading a KV cache on CPU: auto falls to SDPA, a forced FA4 says why it cannot run."""
    from hybridlm.errors import BackendUnavailable
    from hybridlm.kernels.attention import resolve_cached_backend

    q, k = torch.randn(2, 1, 4, 8), torch.randn(2, 16, 2, 8)
    monkeypatch.delenv("HYBRIDLM_ATTENTION", raising=False)
    assert resolve_cached_backend(None, q, k) == resolve_cached_backend("auto", q, k) == "sdpa"
    with pytest.raises(BackendUnavailable, match="FA4 needs CUDA.*'sdpa'"):
        resolve_cached_backend("fa4", q, k)
    monkeypatch.setenv("HYBRIDLM_ATTENTION", "flash")
    with pytest.raises(BackendUnavailable, match="unknown attention backend 'flash'"):
        resolve_cached_backend(None, q, k)
