"""The whole model: decode == forward, packing, generation, init, dtypes."""
import math

import pytest
import torch

from hybridlm import build_model, spec_from_yaml
from hybridlm.builder import account
from hybridlm.errors import ShapeError
from hybridlm.testing import randomize_mamba3_, rel_err

HYBRID = """
version: 1
name: test-hybrid
vocab_size: 64
d_model: 32
blocks:
  M: {kind: mamba3, d_state: 8, headdim: 8, chunk_size: 8, out_norm: pregate_grouped}
  C: {kind: mamba3, d_state: 8, headdim: 16, chunk_size: 4, conv_kernel: 3, discretization: euler}
  A: {kind: attention, n_heads: 4, n_kv_heads: 2, position: rope, window: 6}
  N: {kind: attention, n_heads: 2, position: nope, qk_norm: true}
  F: {kind: swiglu, hidden: 48}
pattern: "M F M A C F N F"
overrides: [{at: [2], set: {mimo_rank: 2, ngroups: 2}}]
"""


def hybrid_model(dtype=torch.float32, **spec_changes):
    spec = spec_from_yaml(HYBRID)
    if spec_changes:
        spec = spec.model_copy(update=spec_changes)
    model = build_model(spec, dtype=dtype, seed=0)
    for layer in model.layers:
        if hasattr(layer.mixer, "B_norm"):
            randomize_mamba3_(layer.mixer, seed=layer.mixer.layer_idx)
    return model.eval()


def test_prefill_then_steps_equals_forward():
    model = hybrid_model()
    ids = torch.randint(0, 64, (3, 29))
    full = model(ids)
    cache = model.allocate_cache(3, 40)
    parts = [model(ids[:, :9], cache=cache), model(ids[:, 9:16], cache=cache)]
    parts += [model(ids[:, t: t + 1], cache=cache) for t in range(16, 29)]
    assert cache.seqlen_offset == 29
    assert rel_err(torch.cat(parts, 1), full) <= 1e-5


def test_packed_equals_separate():
    model = hybrid_model()
    lengths = [9, 1, 17, 5]
    ids = torch.randint(0, 64, (1, sum(lengths)))
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    packed = model(ids, cu_seqlens=cu)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        assert rel_err(packed[:, s:e], model(ids[:, s:e])) <= 1e-5


def test_generate_greedy_matches_argmax_of_full_forward():
    model = hybrid_model()
    prompt = torch.randint(0, 64, (2, 5))
    out = model.generate(prompt, max_new_tokens=8, temperature=0)
    ids = prompt
    for _ in range(8):
        ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, ids)
    assert torch.equal(model.generate(prompt, 8, temperature=1.0, top_k=1), ids)


def test_sampling_is_seeded_and_respects_top_k():
    model = hybrid_model()
    prompt = torch.randint(0, 64, (4, 3))
    a = model.generate(prompt, 6, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(1))
    b = model.generate(prompt, 6, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    # the first sampled token is among the top 5 of the prompt's last logits
    top5 = model(prompt)[:, -1].topk(5).indices
    assert all(int(a[i, 3]) in top5[i].tolist() for i in range(4))


def test_generate_stops_at_eos():
    model = hybrid_model()
    prompt = torch.randint(0, 64, (1, 4))
    first = int(model(prompt)[0, -1].argmax())
    out = model.generate(prompt, 10, temperature=0, eos_token_id=first)
    assert out.shape[1] == 5 and int(out[0, -1]) == first


def test_tied_and_untied_heads():
    tied = hybrid_model()
    assert tied.output.weight is tied.tok_embeddings.weight
    untied = hybrid_model(tie_embeddings=False)
    assert untied.output.weight is not untied.tok_embeddings.weight
    acc_t, acc_u = account(tied), account(untied)
    assert acc_u.total_params - acc_t.total_params == 64 * 32 == acc_u.lm_head_params
    unique = {id(p): p.numel() for p in tied.parameters()}
    assert acc_t.total_params == sum(unique.values())


def test_init_recipe():
    spec = spec_from_yaml(HYBRID).model_copy(update={"vocab_size": 4096, "d_model": 64})
    model = build_model(spec, seed=0)
    n = len(model.layers)
    assert abs(float(model.tok_embeddings.weight.detach().std()) - 0.02) < 0.002
    for layer in model.layers:
        mixer = layer.mixer
        name = {"Mamba3": "out_proj", "Attention": "wo", "SwiGLU": "w2"}[type(mixer).__name__]
        w = mixer.get_submodule(name).weight
        assert abs(float(w.detach().std()) - 0.02 / math.sqrt(n)) < 0.25 * 0.02 / math.sqrt(n), name
        assert torch.all(layer.norm.weight == 1)
    m = model.layers[0].mixer
    assert torch.all(m.D == 1) and torch.all(m.B_bias == 1)  # Mamba-3's own init is kept


def test_meta_build_then_materialize():
    spec = spec_from_yaml(HYBRID)
    model = build_model(spec, device="meta")
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    reference = build_model(spec, seed=0)
    ids = torch.randint(0, 64, (2, 12))
    out = model(ids)
    assert torch.isfinite(out).all()
    for (name, a), (_, b) in zip(model.named_parameters(), reference.named_parameters()):
        assert torch.equal(a, b), name  # same seed, same recipe, same values


def test_bf16_with_fp32_residual():
    ref = hybrid_model()
    model = hybrid_model(dtype=torch.bfloat16, residual_in_fp32=True)
    model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in ref.state_dict().items()})
    seen = []
    model.layers[3].register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    ids = torch.randint(0, 64, (2, 20))
    out = model(ids)
    assert seen == [torch.float32] and out.dtype == torch.bfloat16
    assert rel_err(out.float(), ref(ids)) < 5e-2


def test_forward_errors():
    model = hybrid_model()
    with pytest.raises(ShapeError, match="batch 2"):
        model(torch.zeros(1, 3, dtype=torch.long), cache=model.allocate_cache(2, 8))
    with pytest.raises(ShapeError, match="holds 8 tokens"):
        model(torch.zeros(1, 9, dtype=torch.long), cache=model.allocate_cache(1, 8))
    with pytest.raises(ShapeError, match=r"\(batch, seq\)"):
        model(torch.zeros(5, dtype=torch.long))


def test_training_step_reduces_loss():
    """The reference path is differentiable end to end and trains a toy copy task on CPU."""
    model = hybrid_model().train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, 64, (8, 24))
    losses = []
    for _ in range(15):
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 64), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] - 0.5
