"""Model-level decode on CPU: the Decoder's packed prefill and steps against the full forward,
generation with prompts of different lengths, errors, and a step free of host syncs."""
import pytest
import torch

from hybridlm import build_model, spec_from_yaml
from hybridlm.builder import Decoder
from hybridlm.errors import ShapeError
from hybridlm.testing import randomize_mamba3_, rel_err

# Mamba-3 (SISO, short conv + Euler, MIMO), attention (RoPE GQA with a sliding window, NoPE MHA
# with QK-norm), SwiGLU. Chunk sizes smaller than the prompts so the prefill crosses chunks.
SPEC = """
version: 1
name: decode-test
vocab_size: 64
d_model: 32
blocks:
  M: {kind: mamba3, d_state: 8, headdim: 8, chunk_size: 4, out_norm: pregate_grouped}
  C: {kind: mamba3, d_state: 8, headdim: 16, chunk_size: 4, conv_kernel: 3, discretization: euler}
  W: {kind: attention, n_heads: 4, n_kv_heads: 2, position: rope, window: 5}
  N: {kind: attention, n_heads: 2, position: nope, qk_norm: true}
  F: {kind: swiglu, hidden: 48}
pattern: "M F W C F N M F"
overrides: [{at: [6], set: {mimo_rank: 2, ngroups: 2}}]
"""
# The decode path and the full forward differ only in summation order (chunked scan vs recurrence,
# masked attention over the cache vs over the sequence): measured 2e-7 in fp32, 5e-16 in fp64.
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}
PROMPT_LENGTHS = [7, 1, 12, 4]


def tiny_model(dtype=torch.float32, device=None):
    model = build_model(spec_from_yaml(SPEC), dtype=dtype, device=device, seed=0)
    if device != "meta":
        for layer in model.layers:
            if hasattr(layer.mixer, "B_norm"):
                randomize_mamba3_(layer.mixer, seed=layer.mixer.layer_idx)
    return model.eval()


def prompts(lengths=PROMPT_LENGTHS, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (n,), generator=g) for n in lengths]


@torch.no_grad()
def full_logits(model, seq):
    return model(seq[None])[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@torch.no_grad()
def test_packed_prefill_then_steps_equal_full_forward(dtype):
    model = tiny_model(dtype)
    ps = prompts()
    steps = 9
    decoder = Decoder(model, len(ps), max(PROMPT_LENGTHS) + steps)
    logits = [decoder.prefill(ps)]
    fed = []
    for _ in range(steps):  # greedy: the tokens the model would generate, fed back (teacher forcing)
        token = logits[-1].argmax(-1)
        fed.append(token)
        logits.append(decoder.step(token))
    assert decoder.lengths == [n + steps for n in PROMPT_LENGTHS]
    assert decoder.cache.seqlen_offset == max(PROMPT_LENGTHS) + steps
    decoded = torch.stack(logits, 1)  # (B, steps + 1, V)
    for i, p in enumerate(ps):
        seq = torch.cat([p, torch.stack(fed, 1)[i]])
        expected = full_logits(model, seq)[len(p) - 1:]
        assert rel_err(decoded[i], expected) <= TOL[dtype], i


@torch.no_grad()
def test_step_greedy_feeds_its_own_choice_back():
    """step_greedy's tokens are argmax(step(tokens)), step after step: given once, then fed back on the device
    (None), each returned as a tensor of its own (all six differ from the last); the rows advance as step's.
    None is refused where no step_greedy came before it (a prefill, extend or step since)."""
    model = tiny_model()
    ps = prompts()
    ours, plain = (Decoder(model, len(ps), max(PROMPT_LENGTHS) + 9) for _ in range(2))
    token = ours.prefill(ps).argmax(-1)
    plain.prefill(ps)
    with pytest.raises(ShapeError, match="feeds back the last step_greedy's tokens"):
        ours.step_greedy()
    got = [ours.step_greedy(token)] + [ours.step_greedy() for _ in range(5)]
    want = []
    for _ in range(6):
        token = plain.step(token).argmax(-1)
        want.append(token)
    assert torch.equal(torch.stack(got), torch.stack(want)) and ours.lengths == plain.lengths
    ours.step(token)
    with pytest.raises(ShapeError, match="after a prefill, extend or step"):
        ours.step_greedy()
    ours.step_greedy(token)
    ours.extend(prompts([1, 1, 1, 1]))
    with pytest.raises(ShapeError, match="feeds back"):
        ours.step_greedy()


@torch.no_grad()
def test_dense_prefill_and_reuse_after_reset():
    """A (B, L) prompt tensor; a second prefill on the same Decoder (stale keys and values in the
    cache) gives what a fresh Decoder gives."""
    model = tiny_model()
    ids = torch.randint(0, 64, (3, 6))
    decoder = Decoder(model, 3, 12)
    first = decoder.prefill(ids)
    for t in range(4):
        decoder.step(torch.full((3,), t))
    assert rel_err(first, model(ids)[:, -1]) <= TOL[torch.float32]
    other = prompts([2, 9, 5], seed=1)
    again = [decoder.prefill(other), decoder.step(torch.tensor([1, 2, 3]))]
    fresh = Decoder(model, 3, 12)
    expected = [fresh.prefill(other), fresh.step(torch.tensor([1, 2, 3]))]
    for a, b in zip(again, expected):
        assert torch.equal(a, b)


@pytest.mark.parametrize("chunk, rows", [(None, None), (3, None), (3, 2)])
@torch.no_grad()
def test_extend_continues_the_cache_as_one_prefill(chunk, rows):
    """prefill(a tokens), two steps, extend(b tokens): the logits of the full forward over the whole
    sequence, in one forward or in chunks and row groups (views of a non-empty cache), windowed
    attention and MIMO included; the steps after it too."""
    model = tiny_model()
    g = torch.Generator().manual_seed(5)
    head, more = torch.randint(0, 64, (3, 6), generator=g), torch.randint(0, 64, (3, 9), generator=g)
    decoder = Decoder(model, 3, 24, prefill_chunk=chunk, prefill_rows=rows)
    decoder.prefill(head)
    fed = [torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6])]
    for token in fed:
        decoder.step(token)
    logits = [decoder.extend(more)]
    assert decoder.lengths == [17] * 3 and decoder.cache.seqlen_offset == 17
    after = torch.tensor([7, 8, 9])
    logits.append(decoder.step(after))
    seq = torch.cat([head, torch.stack(fed, 1), more, after[:, None]], 1)
    expected = model(seq)[:, -2:]
    assert rel_err(torch.stack(logits, 1), expected) <= TOL[torch.float32]


@pytest.mark.parametrize("rows", [None, 2])
@torch.no_grad()
def test_extend_rows_of_different_lengths(rows):
    """After a packed prefill of prompts of different lengths and a step, extend by a list of different
    lengths (packed), then by a dense tensor (rows still unequal): every row's logits are those of the
    full forward over its own sequence."""
    model = tiny_model()
    heads, more = prompts(), prompts([5, 11, 1, 3], seed=2)
    dense = torch.randint(0, 64, (4, 4), generator=torch.Generator().manual_seed(3))
    decoder = Decoder(model, 4, 40, prefill_chunk=4, prefill_rows=rows)
    decoder.prefill(heads)
    fed = torch.tensor([1, 2, 3, 4])
    decoder.step(fed)
    after_list = decoder.extend(more)
    after_dense = decoder.extend(dense)
    assert decoder.lengths == [n + 1 + len(m) + 4 for n, m in zip(PROMPT_LENGTHS, more)]
    assert decoder.cache.seqlen_offset == max(decoder.lengths)
    for i, (head, m) in enumerate(zip(heads, more)):
        seq = torch.cat([head, fed[i:i + 1], m, dense[i]])
        full = full_logits(model, seq)
        cut = len(head) + 1 + len(m)
        assert rel_err(after_list[i], full[cut - 1]) <= TOL[torch.float32], i
        assert rel_err(after_dense[i], full[-1]) <= TOL[torch.float32], i


def test_extend_errors():
    model = tiny_model()
    decoder = Decoder(model, 2, 8)
    with pytest.raises(ShapeError, match="extend before prefill"):
        decoder.extend(torch.zeros(2, 3, dtype=torch.long))
    decoder.prefill(prompts([3, 5]))
    with pytest.raises(ShapeError, match="created for 2 sequences; got 3"):
        decoder.extend(torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ShapeError, match="prompt 0 must be a non-empty 1-D tensor"):
        decoder.extend([torch.tensor([], dtype=torch.long), torch.tensor([1])])
    with pytest.raises(ShapeError, match="holds 8 tokens per sequence; row 1 holds 5 and 4 more do not fit"):
        decoder.extend(torch.zeros(2, 4, dtype=torch.long))
    # every row fits (3 + 4, 5 + 1), but the layers' host-side check counts 5 + 4: one clear error, not theirs
    with pytest.raises(ShapeError, match=r"longest row \(5\) plus the longest addition \(4\): create the Decoder "
                                         r"with max_len >= 9"):
        decoder.extend([torch.zeros(4, dtype=torch.long), torch.zeros(1, dtype=torch.long)])
    assert decoder.lengths == [3, 5]  # nothing was written


def test_generate_list_of_prompts_equals_one_prompt_at_a_time():
    model = tiny_model()
    ps = prompts()
    together = model.generate(ps, 8, temperature=0)
    assert isinstance(together, list) and len(together) == len(ps)
    for p, out in zip(ps, together):
        alone = model.generate(p, 8, temperature=0)[0]
        assert torch.equal(out, alone)
        assert torch.equal(out[: len(p)], p)


def test_generate_list_stops_each_row_at_its_eos():
    model = tiny_model()
    ps = prompts()
    greedy = model.generate(ps, 8, temperature=0)
    eos = int(greedy[2][len(ps[2]) + 1])  # the second token row 2 generates
    out = model.generate(ps, 8, temperature=0, eos_token_id=eos)
    for p, full, got in zip(ps, greedy, out):
        new = full[len(p):].tolist()
        cut = new[: new.index(eos) + 1] if eos in new else new
        assert got[len(p):].tolist() == cut
    assert len(out[2]) <= len(ps[2]) + 2 < len(greedy[2])  # row 2 stopped early, the others did not wait


def test_generate_tensor_prompts_unchanged():
    """(B, L) in, (B, L + new) out, as before the Decoder; the eager flag gives the same tokens."""
    model = tiny_model()
    ids = torch.randint(0, 64, (2, 5))
    out = model.generate(ids, 6, temperature=0)
    assert out.shape == (2, 11) and torch.equal(out[:, :5], ids)
    assert torch.equal(model.generate(ids, 6, temperature=0, cuda_graph=False), out)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(model.generate(ids, 6, temperature=0.8, top_k=5, generator=g1),
                       model.generate(ids, 6, temperature=0.8, top_k=5, generator=g2))


def test_cache_overflow_and_input_errors():
    model = tiny_model()
    ps = prompts([3, 5])
    decoder = Decoder(model, 2, 7)
    with pytest.raises(ShapeError, match="step before prefill"):
        decoder.step(torch.zeros(2, dtype=torch.long))
    decoder.prefill(ps)
    decoder.step(torch.zeros(2, dtype=torch.long))
    decoder.step(torch.zeros(2, dtype=torch.long))
    with pytest.raises(ShapeError, match="holds 7 tokens per sequence and a sequence already has 7; create the "
                                         "Decoder with a larger max_len"):
        decoder.step(torch.zeros(2, dtype=torch.long))
    with pytest.raises(ShapeError, match="prompt of 9 tokens does not fit the Decoder's max_len 7"):
        decoder.prefill(prompts([9, 2]))
    with pytest.raises(ShapeError, match="created for 2 sequences; got 3 prompts"):
        decoder.prefill(prompts([1, 2, 3]))
    with pytest.raises(ShapeError, match="prompt 1 must be a non-empty 1-D tensor"):
        decoder.prefill([torch.tensor([1, 2]), torch.tensor([], dtype=torch.long)])
    decoder.prefill(ps)
    with pytest.raises(ShapeError, match=r"one token per row, shape \(2,\)"):
        decoder.step(torch.zeros(2, 1, dtype=torch.long))


@torch.no_grad()
def test_step_has_no_data_dependent_host_work():
    """The step runs on the meta device, where every value-dependent operation (.item(), bool(),
    .tolist(), nonzero, boolean indexing, shapes from values) raises: so the step has fixed shapes
    and never needs a host sync, as CUDA-graph capture requires (tests/gpu checks the capture)."""
    model = tiny_model(device="meta")
    decoder = Decoder(model, 3, 16, cuda_graph=True)  # True is ignored off CUDA
    assert not decoder.uses_cuda_graph
    logits = decoder._step_logits(torch.zeros(3, dtype=torch.long, device="meta"))  # the captured function
    assert logits.shape == (3, 64) and logits.device.type == "meta"


@pytest.mark.parametrize("compile_step", [False, "aot_eager"])
def test_decoder_is_freed_when_its_last_reference_goes(compile_step):
    """No reference cycle through the Decoder: with the cycle collector off, dropping it frees its
    cache at once. (A Decoder that held a bound method of itself kept a batch-128 cache and its
    CUDA graph's pool alive until a collection: the next case of benchmarks/generate.py ran out of
    memory on the H200, 2026-12-03.)"""
    import gc
    import weakref

    model = tiny_model()
    decoder = Decoder(model, 2, 32, compile_step=compile_step, prefill_chunk=5)
    decoder.step(decoder.prefill(prompts([7, 3])).argmax(-1))
    decoder_ref, cache_ref = weakref.ref(decoder), weakref.ref(decoder.cache)
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        del decoder
        assert decoder_ref() is None and cache_ref() is None
    finally:
        if was_enabled:
            gc.enable()
