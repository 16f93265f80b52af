"""spec -> model: ``model/`` builds it (block kinds, init, accounting), ``inference/`` decodes with it
(caches, the batched decoder, generation), ``io/`` saves and loads it (model folders, the
mamba_ssm import)."""
from hybridlm.builder.model.accounting import ModelAccount, account, format_account
from hybridlm.builder.model.build import build_model
from hybridlm.builder.model.hybrid_lm import HybridLM
from hybridlm.builder.model.registry import block_kind, register_block
from hybridlm.builder.inference.cache import HybridCache
from hybridlm.builder.inference.decoder import Decoder

__all__ = ["ModelAccount", "account", "format_account", "build_model", "Decoder", "HybridCache", "HybridLM",
           "block_kind", "register_block"]
