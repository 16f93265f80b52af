"""The training step as torchtitan compiles it: per-block torch.compile over selective activation
checkpointing, with packed batches whose number of documents changes every step.

A graph break inside an activation-checkpointed block makes dynamo give up on the whole block (it
then runs eagerly under the checkpoint's dispatch mode, several times slower on a GPU), and a
recompile per batch costs seconds each step. Both are counted here with dynamo's own counters, on
the Triton backend under the interpreter (aot_eager: dynamo + AOTAutograd, no code generation).
"""
import sys
import warnings

import pytest
import torch
from torch._dynamo.utils import counters

import hybridlm
from hybridlm.testing import rel_err

pytest.importorskip("torchtitan")
pytest.importorskip("hybridlm.kernels.mamba3.triton")

from torchtitan.config import ActivationCheckpoint  # noqa: E402
from torchtitan.distributed.activation_checkpoint import apply_ac  # noqa: E402

from hybridlm.titan.args import HybridModelArgs  # noqa: E402
from hybridlm.titan.data import collate_rows  # noqa: E402
from hybridlm.titan.model import TitanHybridLM  # noqa: E402
from hybridlm.titan.parallelize import _sac_save_list  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def tiny_hybrid() -> TitanHybridLM:
    spec = hybridlm.ModelSpec(
        name="compiled", vocab_size=64, d_model=16,
        blocks={"M": hybridlm.Mamba3Spec(d_state=16, headdim=16, chunk_size=16, backend="triton"),
                "A": hybridlm.AttentionSpec(n_heads=2, position="rope"),
                "F": hybridlm.SwiGLUSpec(hidden=32)},
        pattern="M A F")
    model = TitanHybridLM(HybridModelArgs(spec=spec.to_dict(exclude_defaults=False)))
    model.init_weights()
    return model


def packed_batch(step: int, rows: int = 2, length: int = 16):
    """Rows of 2 to 4 documents (the count changes from step to step), through the dataloader's
    collation, which turns the document starts into cu_seqlens on the host."""
    gen = torch.Generator().manual_seed(step)
    samples = []
    for r in range(rows):
        starts = torch.zeros(length, dtype=torch.bool)
        n_docs = 2 + (step + r) % 3
        starts[torch.randperm(length - 1, generator=gen)[: n_docs - 1] + 1] = True
        samples.append(({"input": torch.randint(0, 64, (length,), generator=gen), "doc_starts": starts},
                        torch.randint(0, 64, (length,), generator=gen)))
    return collate_rows(samples)


def test_collate_rows_gives_host_cu_seqlens_only_for_packed_rows():
    starts = torch.zeros(2, 6, dtype=torch.bool)
    starts[:, 0] = True
    row = lambda s: ({"input": torch.arange(6), "doc_starts": s}, torch.arange(6))  # noqa: E731
    inputs, _ = collate_rows([row(starts[0]), row(starts[1])])
    assert set(inputs) == {"input"}  # one document per row: dense, nothing to mask
    starts[1, 4] = True
    inputs, labels = collate_rows([row(starts[0]), row(starts[1])])
    assert inputs["cu_seqlens"].tolist() == [0, 6, 10, 12] and inputs["cu_seqlens"].device.type == "cpu"
    assert inputs["input"].shape == labels.shape == (2, 6)


def test_compiled_packed_training_has_no_graph_break_and_no_recompile_after_the_first_step():
    model = tiny_hybrid()
    eager = tiny_hybrid()
    eager.load_state_dict(model.state_dict())
    apply_ac(model, ActivationCheckpoint(mode="selective", selective_ac_option="op"), model_compile_enabled=True,
             op_sac_save_list=_sac_save_list(), base_folder="")
    for name, block in model.layers.named_children():
        model.layers.register_module(name, torch.compile(block, backend="aot_eager"))
    graphs_after_first = None
    seen_docs = set()
    for step in range(6):  # the document count cycles through 5, 7, 6: each seen twice
        inputs, labels = packed_batch(step)
        seen_docs.add(inputs["cu_seqlens"].numel() - 1)
        model.zero_grad()
        logits = model(inputs["input"], cu_seqlens=inputs["cu_seqlens"])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        loss.backward()
        assert torch.isfinite(loss)
        if step == 0:
            graphs_after_first = counters["stats"]["unique_graphs"]
        assert not counters["graph_break"], dict(counters["graph_break"])
        assert counters["stats"]["unique_graphs"] == graphs_after_first, f"recompiled at step {step}"
    assert len(seen_docs) >= 3  # the number of documents did change
    assert graphs_after_first == 3  # one graph per block kind (Mamba-3, attention, SwiGLU)
    # and the compiled step computes what the eager model computes, gradients included
    eager_logits = eager(inputs["input"], cu_seqlens=inputs["cu_seqlens"])
    torch.nn.functional.cross_entropy(eager_logits.flatten(0, 1), labels.flatten()).backward()
    assert rel_err(logits, eager_logits) <= 1e-5
    grads = {n.replace("._orig_mod", "").replace("._checkpoint_wrapped_module", ""): p.grad
             for n, p in model.named_parameters()}
    bad = {n: rel_err(grads[n], p.grad) for n, p in eager.named_parameters() if rel_err(grads[n], p.grad) > 1e-4}
    assert not bad, bad

def test_auto_attention_under_compile_falls_back_once_when_fa4_is_broken(tmp_path, monkeypatch):
    """flash-attn-4 installed but its import raises RuntimeError (a broken CUDA/CuTe install), on a
    device that passes the Hopper check: auto attention warns once and runs SDPA, compiled too."""
    from hybridlm.blocks import Attention
    from hybridlm.kernels import fa4, registry

    package = tmp_path / "flash_attn"
    (package / "cute").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "cute" / "__init__.py").write_text("raise RuntimeError('CUDA driver too old for the CuTe DSL')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m == "flash_attn" or m.startswith("flash_attn.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(fa4, "device_reason", lambda device, what: None)  # as if on a Hopper GPU
    monkeypatch.delenv("HYBRIDLM_ATTENTION", raising=False)
    fa4.import_error.cache_clear()
    registry.reset()  # forget FA4's earlier import and warnings
    try:
        block = Attention(32, 4, 2, position="rope", dtype=torch.bfloat16)
        x = torch.randn(2, 12, 32, dtype=torch.bfloat16)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            compiled = torch.compile(block, backend="aot_eager")
            out = compiled(x)
            out_again = compiled(x)
        messages = [str(w.message) for w in caught if "'fa4'" in str(w.message)]
        assert len(messages) == 1, messages
        assert "installed but unusable" in messages[0] and "RuntimeError" in messages[0]
        assert not counters["graph_break"], dict(counters["graph_break"])
        block.backend = "sdpa"
        expected = block(x)
        assert torch.equal(out, expected) and torch.equal(out_again, expected)
    finally:
        fa4.import_error.cache_clear()
        registry.reset()

