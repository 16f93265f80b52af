"""The model torchtitan trains: HybridLM built from the args, with torchtitan's calling conventions."""
from __future__ import annotations

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.experimental import implicit_replication

from hybridlm.builder.model.hybrid_lm import HybridLM
from hybridlm.titan.args import HybridModelArgs


def cu_seqlens_from_starts(doc_starts: Tensor) -> Tensor:
    """(B, L) bool, True where a document begins -> cu_seqlens over the flattened (1, B·L) batch.

    Every row start is a boundary too, so documents never continue across rows."""
    starts = doc_starts.clone()
    starts[:, 0] = True
    positions = torch.nonzero(starts.reshape(-1), as_tuple=False).flatten()
    end = torch.tensor([starts.numel()], device=positions.device)
    return torch.cat([positions, end]).to(torch.int32)


class TitanHybridLM(HybridLM):
    """``model_cls(model_args)`` for torchtitan; forward takes ``cu_seqlens`` from the dataloader."""

    def __init__(self, model_args: HybridModelArgs):
        super().__init__(model_args.model_spec())
        self.model_args = model_args

    def init_weights(self, buffer_device: torch.device | None = None) -> None:
        """The values of ``hybridlm.build_model(spec, seed=...)``, whatever the sharding.

        Sharded (DTensor) parameters are filled from an unsharded copy initialized on the CPU: each
        rank keeps its own part. Random init directly on DTensors would differ between layouts, and
        on CPU meshes it repeats one stream in every tensor-parallel shard (identical heads)."""
        if not any(isinstance(p, DTensor) for p in self.parameters()):
            torch.manual_seed(self.model_args.seed)
            super().init_weights(buffer_device)
            return
        full = HybridLM(self.spec, device="cpu")
        torch.manual_seed(self.model_args.seed)
        full.init_weights()
        with torch.no_grad(), implicit_replication():
            self.load_state_dict(full.state_dict())

    def forward(self, tokens: Tensor, doc_starts: Tensor | None = None, cu_seqlens: Tensor | None = None,
                **unused) -> Tensor:
        """tokens (B, L); documents packed into the rows come as ``cu_seqlens`` over the flattened
        rows (our dataloader computes it on the host), or as ``doc_starts`` (B, L) from other
        callers (one host sync here). The rows stay rows: attention masks by document within each
        row, Mamba-3 scans the flattened documents."""
        if cu_seqlens is None and doc_starts is not None and bool(doc_starts[:, 1:].any()):
            cu_seqlens = cu_seqlens_from_starts(doc_starts)
        if cu_seqlens is None:
            return super().forward(tokens)
        # the number of documents changes every batch: compile for any, once (no recompiles)
        torch._dynamo.maybe_mark_dynamic(cu_seqlens, 0)
        return super().forward(tokens, cu_seqlens=cu_seqlens)

    def get_attention_masks(self, *args, **kwargs):
        # torchtitan's validator calls this unconditionally and only tolerates TypeError.
        raise TypeError("hybridlm models take document boundaries as doc_starts, not attention masks")
