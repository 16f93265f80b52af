"""spec -> model: construction, init, accounting, caches and generation."""
from hybridlm.builder.accounting import ModelAccount, account, format_account
from hybridlm.builder.build import build_model
from hybridlm.builder.decode import Decoder
from hybridlm.builder.model import HybridCache, HybridLM
from hybridlm.builder.registry import block_kind, register_block

__all__ = ["ModelAccount", "account", "format_account", "build_model", "Decoder", "HybridCache", "HybridLM",
           "block_kind", "register_block"]
