"""Preset specs as Python functions; ``specs/*.yaml`` are these, written out.

Families (``<arch>-<size>``), sizes ``tiny`` (CPU demos, byte vocabulary), ``small`` (~150M) and
``1.5b`` (the paper's dims: d_model 2048, 24 mixer layers each followed by SwiGLU):

* ``mamba3``       pure Mamba-3 (SISO), ``(M F) *n``
* ``mamba3-mimo``  MIMO R=4, chunk 16, SwiGLU shrunk to match the SISO model's parameters (paper
                   matching; at 1.5B this gives its 4096 -> 3824)
* ``transformer``  Llama-style: RoPE GQA attention + SwiGLU, SwiGLU sized to match the Mamba-3 model

The matched SwiGLU widths are data here; ``hybridlm.builder.model.matching.match_swiglu_hidden``
computes them and a test checks that they still match.
* ``hybrid``       the paper's 5:1 hybrid: NoPE attention after every five Mamba-3 layers, Mamba-3
                   with the pre-gate grouped RMSNorm (Norm*) that makes retrieval length-generalize
* ``mamba2like``   ablation: exponential-Euler, no rotation, no B/C bias, short conv, post-gate norm

plus ``tiny-hybrid``, the 3:1 example of the README. Regenerate the YAML files with
``python -m hybridlm.layouts.presets specs/``.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from hybridlm.layouts.blocks import AttentionSpec, Mamba3Spec, SwiGLUSpec
from hybridlm.layouts.io import dump_spec
from hybridlm.layouts.spec import ModelSpec, Override


@dataclass(frozen=True)
class Size:
    d_model: int
    n_mixers: int  # mixer layers (Mamba-3 or attention), each followed by a SwiGLU
    vocab_size: int
    hidden: int  # SwiGLU hidden of the pure Mamba-3 model
    mimo_hidden: int  # ... of the MIMO R=4 model with the same parameter count
    transformer_hidden: int  # ... of the Transformer with the same parameter count
    d_state: int
    headdim: int
    n_heads: int  # attention heads
    n_kv_heads: int


SIZES: dict[str, Size] = {
    "tiny": Size(d_model=128, n_mixers=6, vocab_size=256, hidden=352, mimo_hidden=272, transformer_hidden=512,
                 d_state=32, headdim=32, n_heads=4, n_kv_heads=2),
    "small": Size(d_model=768, n_mixers=12, vocab_size=32768, hidden=2560, mimo_hidden=2288,
                  transformer_hidden=3536, d_state=128, headdim=64, n_heads=12, n_kv_heads=4),
    "1.5b": Size(d_model=2048, n_mixers=24, vocab_size=128256, hidden=4096, mimo_hidden=3824,
                 transformer_hidden=6656, d_state=128, headdim=64, n_heads=16, n_kv_heads=4),
}


def _mamba3(size: Size, **kw) -> Mamba3Spec:
    return Mamba3Spec(d_state=size.d_state, headdim=size.headdim, **kw)


def _spec(name: str, size: Size, blocks: dict, pattern: str, **kw) -> ModelSpec:
    return ModelSpec(name=name, vocab_size=size.vocab_size, d_model=size.d_model, blocks=blocks, pattern=pattern, **kw)


def mamba3(size_name: str) -> ModelSpec:
    s = SIZES[size_name]
    return _spec(f"mamba3-{size_name}", s, {"M": _mamba3(s), "F": SwiGLUSpec(hidden=s.hidden)},
                 f"(M F) *{s.n_mixers}")


def mamba3_mimo(size_name: str) -> ModelSpec:
    s = SIZES[size_name]
    return _spec(f"mamba3-mimo-{size_name}", s,
                 {"M": _mamba3(s, mimo_rank=4, chunk_size=16), "F": SwiGLUSpec(hidden=s.mimo_hidden)},
                 f"(M F) *{s.n_mixers}")


def transformer(size_name: str) -> ModelSpec:
    s = SIZES[size_name]
    return _spec(f"transformer-{size_name}", s,
                 {"A": AttentionSpec(n_heads=s.n_heads, n_kv_heads=s.n_kv_heads, position="rope"),
                  "F": SwiGLUSpec(hidden=s.transformer_hidden)},
                 f"(A F) *{s.n_mixers}")


def hybrid(size_name: str) -> ModelSpec:
    s = SIZES[size_name]
    return _spec(f"hybrid-{size_name}", s,
                 {"M": _mamba3(s, out_norm="pregate_grouped"),
                  "A": AttentionSpec(n_heads=s.n_heads, n_kv_heads=s.n_kv_heads, position="nope"),
                  "F": SwiGLUSpec(hidden=s.hidden)},
                 f"((M F) *5 A F) *{s.n_mixers // 6}")


def mamba2like(size_name: str) -> ModelSpec:
    s = SIZES[size_name]
    m2 = _mamba3(s, discretization="euler", rotation=False, bc_bias=False, conv_kernel=4,
                 out_norm="postgate_default")
    return _spec(f"mamba2like-{size_name}", s, {"M": m2, "F": SwiGLUSpec(hidden=s.hidden)},
                 f"(M F) *{s.n_mixers}")


def tiny_hybrid() -> ModelSpec:
    """The README's example: a 3:1 hybrid with NoPE attention and the pre-gate grouped norm."""
    return ModelSpec(
        name="tiny-hybrid", vocab_size=256, d_model=128,
        blocks={"M": Mamba3Spec(d_state=32, headdim=32, out_norm="pregate_grouped"),
                "A": AttentionSpec(n_heads=4, n_kv_heads=2, position="nope"),
                "F": SwiGLUSpec(hidden=352)},
        pattern="((M F) *3 A F) *2",
        overrides=[Override(at=[0, 2], set={"d_state": 16})])


_FAMILIES: dict[str, Callable[[str], ModelSpec]] = {
    "mamba3": mamba3, "mamba3-mimo": mamba3_mimo, "transformer": transformer, "hybrid": hybrid,
    "mamba2like": mamba2like,
}
PRESETS: dict[str, Callable[[], ModelSpec]] = {"tiny-hybrid": tiny_hybrid}
for _arch, _fn in _FAMILIES.items():
    for _size in SIZES:
        PRESETS[f"{_arch}-{_size}"] = (lambda fn=_fn, size=_size: fn(size))


def preset_names() -> list[str]:
    return list(PRESETS)


def get_preset(name: str) -> ModelSpec:
    try:
        return PRESETS[name]()
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}") from None


def spec_or_preset(arg: str) -> ModelSpec:
    """A YAML spec file, or a preset name (what every command's SPEC argument accepts)."""
    from hybridlm.errors import SpecError
    from hybridlm.layouts.io import load_spec

    if Path(arg).exists() or arg.endswith((".yaml", ".yml")):
        return load_spec(arg)
    if arg in PRESETS:
        return get_preset(arg)
    raise SpecError("", f"{arg!r} is neither a spec file nor a preset (presets: {', '.join(PRESETS)})")


def write_presets(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in PRESETS:
        path = folder / f"{name}.yaml"
        path.write_text(f"# preset {name!r}: generated by `python -m hybridlm.layouts.presets specs/`\n"
                        + dump_spec(get_preset(name)))
        paths.append(path)
    return paths


if __name__ == "__main__":
    for p in write_presets(sys.argv[1] if len(sys.argv) > 1 else "specs"):
        print(p)
