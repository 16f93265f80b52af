"""Model arguments for torchtitan: plain JSON-able fields copied from a hybridlm spec."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn
from torchtitan.protocols.model import BaseModelArgs

from hybridlm.errors import HybridLMError


@dataclass
class HybridModelArgs(BaseModelArgs):
    spec_source: str = ""
    spec: dict[str, Any] = field(default_factory=dict)  # ModelSpec.to_dict(): JSON-able, logged by torchtitan
    max_seq_len: int = 2048
    n_layers: int = 0
    vocab_size: int = 0
    backend: str = ""
    seed: int = 0

    def model_spec(self):
        from hybridlm.layouts.spec import ModelSpec

        if not self.spec:
            raise HybridLMError("no hybridlm spec given: pass --hybrid.spec specs/<name>.yaml (or a preset name)")
        return ModelSpec.model_validate(with_backend(self.spec, self.backend))

    def update_from_config(self, job_config, **kwargs) -> None:
        from hybridlm.layouts.presets import spec_or_preset

        source = job_config.hybrid.spec or self.spec_source
        if source:
            spec = spec_or_preset(source)
            self.spec_source, self.spec = source, spec.to_dict(exclude_defaults=False)
        spec = self.model_spec()
        self.max_seq_len = job_config.training.seq_len
        self.n_layers = spec.n_blocks
        self.vocab_size = spec.vocab_size
        self.backend = job_config.hybrid.backend
        if self.backend:
            from importlib import import_module

            from hybridlm.layouts.backends import backend_names, kinds_accepting

            import_module("hybridlm.kernels")  # registers the kernel backends
            if not kinds_accepting(self.backend):
                known = "; ".join(f"{kind}: {', '.join(backend_names(kind)[1:])}" for kind in ("mamba3", "attention"))
                raise HybridLMError(f"--hybrid.backend {self.backend!r} is no registered kernel backend ({known})")
        self.seed = job_config.hybrid.seed
        par = job_config.parallelism
        if par.context_parallel_degree > 1:
            raise HybridLMError("context parallelism is not supported: Mamba-3 layers would need state passing "
                                "across ranks; use data/tensor parallelism (parallelism.context_parallel_degree=1)")
        if par.pipeline_parallel_degree > 1:
            raise HybridLMError("pipeline parallelism is not supported for hybrid models in torchtitan 0.2.2 "
                                "(its PP schedule back-propagates an unnormalized loss); use FSDP")

    def get_nparams_and_flops(self, model: nn.Module, seq_len: int) -> tuple[int, int]:
        """The builder's accounting: 6 x matmul weights (LM head included) + 3 x the forward sequence-mixing
        FLOPs — attention QK/AV without a causal discount, exactly torchtitan's llama3 term, and the
        Mamba-3 chunked scan."""
        from hybridlm.builder.model.accounting import account

        acc = account(self.model_spec(), seq_len=seq_len)
        return acc.total_params, acc.train_flops_per_token


def with_backend(spec: dict[str, Any], backend: str) -> dict[str, Any]:
    """``spec`` (a ModelSpec dict) with ``backend`` given to every block that leaves its backend on
    ``auto`` and whose kind has a backend of that name (``triton``: the Mamba-3 blocks; ``sdpa``: the
    attention blocks). The model is built from this; the run record keeps the spec as given, so a
    resume with another ``--hybrid.backend`` is not a spec change."""
    if not backend:
        return spec
    from hybridlm.layouts.backends import kinds_accepting

    kinds = kinds_accepting(backend)
    blocks = {symbol: {**block, "backend": backend}
              if isinstance(block, dict) and block.get("kind") in kinds and block.get("backend", "auto") == "auto"
              else block for symbol, block in spec.get("blocks", {}).items()}
    return {**spec, "blocks": blocks}
