"""Parameters, training FLOPs per token and inference memory of a spec, without allocating it.

What a block adds beyond its weights (sequence-mixing FLOPs, decode state) comes from its kind's
:class:`~hybridlm.builder.model.registry.BlockKind`; nothing here names a kind.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hybridlm.blocks.norms import RMSNorm
from hybridlm.blocks.residual import ResidualBlock
from hybridlm.builder.model.hybrid_lm import HybridLM
from hybridlm.builder.model.registry import block_kind
from hybridlm.errors import HybridLMError
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
    ssm_state_bytes: int  # recurrent state (Mamba-3 layers, ...), per sequence
    kv_cache_bytes: int  # KV caches (attention layers) at ``context`` tokens, per sequence

    @property
    def non_embedding_params(self) -> int:
        return self.total_params - self.embedding_params

    @property
    def inference_bytes_per_sequence(self) -> int:
        return self.ssm_state_bytes + self.kv_cache_bytes


def _matmul_params(module: nn.Module) -> int:
    """Weights that take part in a per-token multiply-add (Linear and conv weights)."""
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv1d)))


def decode_state_bytes(model: HybridLM, context: int, dtype: torch.dtype) -> int:
    """Bytes of decode state (Mamba-3 states, KV caches) one sequence of ``context`` tokens needs."""
    return sum(block_kind(resolved.spec.kind).state_bytes(layer.mixer, context, dtype)
               for layer, resolved in zip(model.layers, model.spec.resolve(), strict=True))


def account(spec_or_model: ModelSpec | HybridLM, seq_len: int = 2048, context: int | None = None,
            state_dtype: torch.dtype = torch.bfloat16) -> ModelAccount:
    """Count a spec (each distinct block built once on the meta device) or a model.

    Training FLOPs per token = 6 x (matmul weights, LM head included even when tied)
    + 3 x (each kind's forward FLOPs beyond its weights at ``seq_len``: attention QK/AV as torchtitan
    counts them, without a causal discount; the Mamba-3 chunked scan). Inference bytes: each kind's
    decode state (Mamba-3: fp32 SSM state and angles, k/v in ``state_dtype``; attention: the KV cache
    in ``state_dtype`` at ``context`` tokens).
    """
    context = seq_len if context is None else context
    if isinstance(spec_or_model, HybridLM):
        spec, model = spec_or_model.spec, spec_or_model
        layers = list(model.layers)
        embedding, head_weights = model.tok_embeddings.weight.numel(), model.output.weight.numel()
        total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    else:
        # A spec of 100,000 blocks repeats a few distinct blocks: build each once, not the whole model.
        spec, model = spec_or_model, None
        layers = _distinct_layers(spec)
        embedding = head_weights = spec.vocab_size * spec.d_model
        total = None
    blocks = []
    seq_flops = 0
    matmul = head_weights  # the LM head is a matmul even when tied
    counted: dict[int, tuple[int, int, int, int]] = {}
    ssm = kv = 0
    for layer, resolved in zip(layers, spec.resolve()):
        kind = block_kind(resolved.spec.kind)
        if id(layer) not in counted:
            mixer = layer.mixer
            counted[id(layer)] = (_matmul_params(mixer), kind.flops(mixer, seq_len),
                                  sum(p.numel() for p in layer.parameters()),
                                  kind.state_bytes(mixer, context, state_dtype))
        block_matmul, block_seq, params, state = counted[id(layer)]
        matmul += block_matmul
        seq_flops += block_seq
        if kind.kv_cache:
            kv += state
        else:
            ssm += state
        blocks.append(BlockAccount(
            index=resolved.index, symbol=resolved.symbol, kind=resolved.spec.kind,
            summary=resolved.spec.describe(spec.d_model), params=params,
            fwd_flops_per_token=2 * block_matmul + block_seq, state_bytes=state))
    head = 0 if spec.tie_embeddings else head_weights
    if total is None:
        final_norm = sum(p.numel() for p in RMSNorm(spec.d_model, device="meta").parameters())
        total = embedding + head + final_norm + sum(b.params for b in blocks)
    return ModelAccount(
        name=spec.name, seq_len=seq_len, context=context, state_dtype=str(state_dtype).replace("torch.", ""),
        total_params=total, embedding_params=embedding, lm_head_params=head, blocks=tuple(blocks),
        train_flops_per_token=6 * matmul + 3 * seq_flops, ssm_state_bytes=ssm, kv_cache_bytes=kv)


def _distinct_layers(spec: ModelSpec) -> list[nn.Module]:
    """One meta-device residual block per resolved block, shared between blocks of equal config."""
    built: dict[str, nn.Module] = {}
    layers = []
    for resolved in spec.resolve():
        key = f"{type(resolved.spec).__name__}:{resolved.spec!r}"
        if key not in built:
            try:
                mixer = block_kind(resolved.spec.kind).build(resolved.spec, d_model=spec.d_model,
                                                             layer_idx=resolved.index, norm_eps=spec.norm_eps,
                                                             device="meta")
            except RuntimeError as err:  # torch refuses a tensor whose byte size overflows 64 bits
                if "overflow" not in str(err):
                    raise
                raise HybridLMError(f"block {resolved.index} ({resolved.symbol}) at d_model {spec.d_model} has "
                                    "weights too large for any tensor (over 2**63 bytes): use a smaller "
                                    "d_model") from None
            built[key] = ResidualBlock(mixer, spec.d_model, spec.norm_eps, spec.residual_in_fp32, device="meta")
        layers.append(built[key])
    return layers


def estimate_memory_bytes(spec: ModelSpec, *, batch_size: int = 1, tokens: int = 1, logit_rows: int = 1,
                          cache_tokens: int = 0, dtype: torch.dtype = torch.float32,
                          include_weights: bool = True) -> int:
    """A lower bound of the memory a forward of ``batch_size`` x ``tokens`` needs: the weights, a few
    (B, L, d_model) activations, fp32 logits for ``logit_rows`` positions per row and, with
    ``cache_tokens``, the decode cache (KV at that length + Mamba-3 state) of every row.
    ``include_weights=False`` for a model already loaded.

    Closed form in the sizes that grow, so a 2**40 vocabulary or a billion tokens costs nothing to ask about.
    """
    element = torch.empty((), dtype=dtype).element_size()
    acc = account(spec, seq_len=1, context=max(cache_tokens, 1), state_dtype=dtype)
    weights = acc.total_params * element if include_weights else 0
    activations = 4 * batch_size * tokens * spec.d_model * element
    logits = batch_size * logit_rows * spec.vocab_size * 4
    cache = batch_size * acc.inference_bytes_per_sequence if cache_tokens else 0
    return weights + activations + logits + cache


def available_memory_bytes(device: torch.device | str = "cpu") -> int | None:
    """Free memory of a CUDA device, else the machine's physical memory; None when unknown."""
    import os

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(what: str, needed: int, device: torch.device | str = "cpu", fix: str = "") -> None:
    """Refuse, before allocating, what cannot fit: a HybridLMError with the estimate in it."""
    available = available_memory_bytes(device)
    if available is not None and needed > available:
        kind = "free on" if torch.device(device).type == "cuda" else "of memory on"
        raise HybridLMError(f"{what} needs about {human_bytes(needed)}, more than the {human_bytes(available)} "
                            f"{kind} {device}" + (f"; {fix}" if fix else ""))


def human(n: float, unit: str = "") -> str:
    """3 significant digits with a K / M / B / T suffix (counts, FLOPs)."""
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def human_bytes(n: float) -> str:
    for div, suffix in ((2**50, "PiB"), (2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
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
