"""Greedy choice (hybridlm/kernels/greedy/): the reference's two-stage form and the Triton kernel (on the
CPU through the interpreter) give argmax's exact index, ties, NaNs and -inf rows included; the Decoder's
step_greedy gives the tokens of argmax(step(tokens))."""
import importlib.util

import pytest
import torch

from hybridlm.errors import ShapeError
from hybridlm.kernels import greedy
from hybridlm.kernels.greedy import reference

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="needs triton (TRITON_INTERPRET=1 on the CPU)")


def planted(vocab: int, dtype: torch.dtype, rows: int = 6) -> torch.Tensor:
    """Integer-valued logits (ties are common) with a maximum planted in the first and last chunks of row 0,
    twice within one chunk in row 1, random row 2, NaNs in row 3 (two, after a larger number), -inf row 4."""
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randint(-50, 50, (rows, vocab), generator=g).to(dtype)
    logits[0, [7 % vocab, vocab - 3 if vocab > 3 else 0]] = 100
    logits[1, [vocab // 2, min(vocab // 2 + 1, vocab - 1)]] = 100
    logits[2] = torch.randn(vocab, generator=g).to(dtype)
    logits[3, 0] = 1000
    logits[3, [vocab - 1, vocab // 3]] = float("nan")
    logits[4] = float("-inf")
    return logits


@pytest.mark.parametrize("vocab", [128256, 50304, 50257])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_two_stage_reference_is_argmax_ties_included(vocab, dtype):
    """The chunked form of wide vocabularies (chunks' maxima, then the first chunk holding the row's maximum)
    returns argmax's index, the first of tied maxima included; a width no power of two from 16 divides
    (50257) falls back to argmax itself."""
    logits = planted(vocab, dtype)[:3]
    assert torch.equal(reference.argmax(logits, split=True), logits.argmax(-1))
    assert int(reference.argmax(logits, split=True)[0]) == 7
    assert int(reference.argmax(logits, split=True)[1]) == vocab // 2
    assert torch.equal(greedy.argmax(logits), logits.argmax(-1))  # on the CPU: argmax itself


@needs_triton
@pytest.mark.parametrize("vocab", [1, 7, 2048, 2049, 50257, 128256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_argmax_is_argmax(vocab, dtype):
    """One kernel, chunks of 2,048 logits combined by the row's last program: exactly argmax (ties to the
    first index, a NaN wins, the first of them; an all -inf row gives 0), at widths below, at and across
    the chunk, written into ``out``; its arrival counters back at zero after."""
    from hybridlm.kernels.tickets import counters

    logits = planted(vocab, dtype) if vocab > 3 else torch.randn(3, vocab).to(dtype)
    want = logits.argmax(-1)
    if vocab > 3:
        assert int(want[3]) == min(vocab - 1, vocab // 3) and int(want[4]) == 0  # what torch does, checked
    assert torch.equal(greedy.argmax(logits, backend="triton"), want)
    out = torch.full((logits.shape[0],), -1, dtype=torch.int64)
    assert greedy.argmax(logits, out=out, backend="triton") is out and torch.equal(out, want)
    assert int(counters(logits.device, "greedy").abs().sum()) == 0


@needs_triton
def test_triton_argmax_of_strided_rows():
    """Rows of a wider tensor (the logits of a padded batch, say) are read in place at their stride."""
    wide = torch.randn(4, 5000)
    assert torch.equal(greedy.argmax(wide[:, :4097], backend="triton"), wide[:, :4097].argmax(-1))


def test_argmax_refuses_bad_shapes():
    with pytest.raises(ShapeError, match=r"logits \(batch, vocab\)"):
        greedy.argmax(torch.randn(5))
    with pytest.raises(ShapeError, match="out must be"):
        greedy.argmax(torch.randn(2, 5), out=torch.zeros(2, dtype=torch.int32))


def test_outgrown_counters_stay_allocated():
    """A larger request replaces a kernel's counters; the old ones stay allocated, since a CUDA graph captured
    with them keeps writing there (their address is all it holds)."""
    import weakref

    from hybridlm.kernels.tickets import counters, tickets

    small = tickets(torch.device("cpu"), 3, "test-outgrown")
    kept = weakref.ref(small)
    large = tickets(torch.device("cpu"), 5000, "test-outgrown")
    assert large.numel() == 5000 and counters(torch.device("cpu"), "test-outgrown") is large
    del small
    assert kept() is not None and int(kept().abs().sum()) == 0


def test_the_kernel_runs_by_default_only_while_switched_on(monkeypatch):
    """With TRITON_BY_DEFAULT off (knob GREEDY_TRITON), a call naming no backend asks the registry for the
    reference; on (the default), for ``auto``, which is the kernel on CUDA."""
    from hybridlm.kernels import registry

    asked = []
    real = registry.choose
    monkeypatch.setattr(registry, "choose", lambda kind, op, requested, *rest: asked.append(requested) or real(
        kind, op, requested, *rest))
    monkeypatch.setattr(greedy, "TRITON_BY_DEFAULT", False)
    greedy.argmax(torch.randn(2, 9))
    monkeypatch.setattr(greedy, "TRITON_BY_DEFAULT", True)
    greedy.argmax(torch.randn(2, 9))
    assert asked == ["reference", "auto"]
    assert real(greedy.KIND, greedy.OP, "auto", "cuda", 0, torch.bfloat16, 128256) == "triton"
