"""The spec layer: what a model is, as data (pydantic models, YAML, JSON Schema)."""
from hybridlm.layouts.blocks import AttentionSpec, BlockSpec, Mamba3Spec, SwiGLUSpec
from hybridlm.layouts.io import dump_spec, load_spec, save_spec, spec_from_yaml, spec_json_schema
from hybridlm.layouts.pattern import PatternError, expand_pattern
from hybridlm.layouts.registry import block_kinds, block_spec_class, register_block_spec
from hybridlm.layouts.spec import ModelSpec, Override, ResolvedBlock

__all__ = [
    "AttentionSpec", "BlockSpec", "Mamba3Spec", "SwiGLUSpec", "ModelSpec", "Override", "ResolvedBlock",
    "dump_spec", "load_spec", "save_spec", "spec_from_yaml", "spec_json_schema", "PatternError",
    "expand_pattern", "block_kinds", "block_spec_class", "register_block_spec",
]
