"""Parameters, training FLOPs per token and inference memory of a spec, without allocating it."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hybridlm.builder.model import HybridLM
from hybridlm.layouts.spec import ModelSpec


@dataclass(frozen=True)
class BlockAccount:
    index: int
    symbol: str
    kind: str
    summary: str
    params: int
    fwd_flops_per_token: int  # matmuls (2 per weight) + sequence mixing, at seq_len
    state_bytes: int  # decode state per sequence at the accounted context


@dataclass(frozen=True)
class ModelAccount:
    name: str
    seq_len: int
    context: int
    state_dtype: str
    total_params: int
    embedding_params: int
    lm_head_params: int  # 0 when tied to the embedding
    blocks: tuple[BlockAccount, ...]
    train_flops_per_token: int
    ssm_state_bytes: int  # recurrent state of all Mamba-3 layers, per sequence
    kv_cache_bytes: int  # KV cache of all attention layers at ``context`` tokens, per sequence

    @property
    def non_embedding_params(self) -> int:
        return self.total_params - self.embedding_params

    @property
    def inference_bytes_per_sequence(self) -> int:
        return self.ssm_state_bytes + self.kv_cache_bytes


def _matmul_params(module: nn.Module) -> int:
    """Weights that take part in a per-token multiply-add (Linear and conv weights)."""
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv1d)))


def _sequence_flops(mixer: nn.Module, seq_len: int) -> int:
    if hasattr(mixer, "attention_flops_per_token"):
        return mixer.attention_flops_per_token(seq_len)
    if hasattr(mixer, "scan_flops_per_token"):
        return mixer.scan_flops_per_token(seq_len)
    return 0


def _state_bytes(mixer: nn.Module, context: int, dtype: torch.dtype) -> int:
    fn = getattr(mixer, "state_bytes", None)  # state_bytes(context, dtype): decode state per sequence
    return 0 if fn is None else fn(context, dtype)


def account(spec_or_model: ModelSpec | HybridLM, seq_len: int = 2048, context: int | None = None,
            state_dtype: torch.dtype = torch.bfloat16) -> ModelAccount:
    """Count a spec (built on the meta device) or a model.

    Training FLOPs per token = 6 x (matmul weights, LM head included even when tied)
    + 3 x (forward attention QK/AV FLOPs at ``seq_len``, as torchtitan counts them, without a causal
    discount + the Mamba-3 chunked-scan FLOPs). Inference bytes: Mamba-3 state (fp32 SSM state and
    angles, k/v in ``state_dtype``) and KV cache in ``state_dtype`` at ``context`` tokens.
    """
    model = spec_or_model if isinstance(spec_or_model, HybridLM) else HybridLM(spec_or_model, device="meta")
    spec = model.spec
    context = seq_len if context is None else context
    blocks = []
    seq_flops = 0
    matmul = model.output.weight.numel()  # the LM head is a matmul even when tied
    for layer, resolved in zip(model.layers, spec.resolve()):
        mixer = layer.mixer
        block_matmul, block_seq = _matmul_params(mixer), _sequence_flops(mixer, seq_len)
        matmul += block_matmul
        seq_flops += block_seq
        flops = 2 * block_matmul + block_seq
        blocks.append(BlockAccount(
            index=resolved.index, symbol=resolved.symbol, kind=resolved.spec.kind,
            summary=resolved.spec.describe(spec.d_model),
            params=sum(p.numel() for p in layer.parameters()),
            fwd_flops_per_token=flops, state_bytes=_state_bytes(mixer, context, state_dtype)))
    unique = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in unique.values())
    embedding = model.tok_embeddings.weight.numel()
    head = 0 if spec.tie_embeddings else model.output.weight.numel()
    ssm = sum(b.state_bytes for b in blocks if b.kind != "attention")
    kv = sum(b.state_bytes for b in blocks if b.kind == "attention")
    return ModelAccount(
        name=spec.name, seq_len=seq_len, context=context, state_dtype=str(state_dtype).replace("torch.", ""),
        total_params=total, embedding_params=embedding, lm_head_params=head, blocks=tuple(blocks),
        train_flops_per_token=6 * matmul + 3 * seq_flops, ssm_state_bytes=ssm, kv_cache_bytes=kv)


def human(n: float, unit: str = "") -> str:
    """3 significant digits with a K / M / B / T suffix (counts, FLOPs)."""
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def human_bytes(n: float) -> str:
    for div, suffix in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= div:
            return f"{n / div:.2f} {suffix}"
    return f"{n:.0f} B"


def format_account(acc: ModelAccount, *, per_block: bool = True) -> str:
    lines = []
    if per_block:
        rows = [("#", "sym", "kind", "params", "fwd FLOP/tok", "state/seq", "config")]
        for b in acc.blocks:
            rows.append((str(b.index), b.symbol, b.kind, human(b.params), human(b.fwd_flops_per_token),
                         human_bytes(b.state_bytes) if b.state_bytes else "-", b.summary))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
        for r in rows:
            lines.append("  ".join(c.rjust(w) if i in (0, 3, 4, 5) else c.ljust(w)
                                   for i, (c, w) in enumerate(zip(r, widths))) + "  " + r[-1])
        lines.append("")
    tied = "tied" if acc.lm_head_params == 0 else f"untied LM head {human(acc.lm_head_params)}"
    lines += [
        f"parameters        {acc.total_params:,} ({human(acc.total_params)})",
        f"  embedding       {acc.embedding_params:,} ({tied})",
        f"  non-embedding   {acc.non_embedding_params:,} ({human(acc.non_embedding_params)})",
        f"train FLOPs/token {human(acc.train_flops_per_token)} at seq_len {acc.seq_len} (fwd + bwd)",
        f"inference memory per sequence ({acc.state_dtype} k/v, fp32 SSM state):",
        f"  SSM state       {human_bytes(acc.ssm_state_bytes)} (constant in length)",
        f"  KV cache        {human_bytes(acc.kv_cache_bytes)} at {acc.context} tokens",
    ]
    return "\n".join(lines)
