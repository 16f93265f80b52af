"""The model torchtitan trains: HybridLM built from the args, with torchtitan's calling conventions."""
from __future__ import annotations

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.experimental import implicit_replication

from hybridlm.builder.model import HybridLM
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
    """``model_cls(model_args)`` for torchtitan; forward takes ``doc_starts`` from the dataloader."""

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

    def forward(self, tokens: Tensor, doc_starts: Tensor | None = None, **unused) -> Tensor:
        if doc_starts is None or not bool(doc_starts[:, 1:].any()):
            return super().forward(tokens)
        batch, length = tokens.shape
        logits = super().forward(tokens.reshape(1, -1), cu_seqlens=cu_seqlens_from_starts(doc_starts))
        return logits.view(batch, length, -1)

    def get_attention_masks(self, *args, **kwargs):
        # torchtitan's validator calls this unconditionally and only tolerates TypeError.
        raise TypeError("hybridlm models take document boundaries as doc_starts, not attention masks")
