"""Build a hybrid from Python objects, print its accounting, run it once.

    python examples/build_and_account.py [--tiny]

The same spec as YAML is `hybridlm dump_spec(spec)`; `hybridlm show` prints the same table.
"""
import argparse

import torch

import hybridlm


def make_spec(tiny: bool) -> hybridlm.ModelSpec:
    d_model = 64 if tiny else 768
    return hybridlm.ModelSpec(
        name="my-hybrid", vocab_size=256 if tiny else 32768, d_model=d_model,
        blocks={
            "M": hybridlm.Mamba3Spec(d_state=16 if tiny else 128, headdim=16 if tiny else 64,
                                     out_norm="pregate_grouped"),
            "A": hybridlm.AttentionSpec(n_heads=4 if tiny else 12, n_kv_heads=2 if tiny else 4, position="nope"),
            "F": hybridlm.SwiGLUSpec(),
        },
        pattern="((M F) *5 A F) *2" if not tiny else "(M F) *2 A F",
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true", help="a small model (what CI runs)")
    args = parser.parse_args()
    spec = make_spec(args.tiny)
    print(hybridlm.dump_spec(spec))
    # counted on the meta device: no memory is allocated, whatever the size
    print(hybridlm.format_account(hybridlm.account(spec, seq_len=2048, context=8192)))
    if args.tiny:
        model = hybridlm.build_model(spec, seed=0).eval()
        ids = torch.randint(0, spec.vocab_size, (2, 32))
        with torch.no_grad():
            logits = model(ids)
        print(f"logits {tuple(logits.shape)}, finite: {bool(torch.isfinite(logits).all())}")


if __name__ == "__main__":
    main()
