"""Evaluate retrieval past the training length for two model folders, side by side.

    python examples/eval_two_models.py MODEL_A MODEL_B [--task mqar:pairs=4] [--lengths 1x,2x,4x,8x]
    python examples/eval_two_models.py --tiny        # two random-weight tiny models (what CI runs)

The same as `hybridlm eval MODEL_A MODEL_B --task ... --lengths ...`, through the Python API:
every model sees the same seeded examples; a length `Nx` is N times the length a model was
trained at (recorded in its folder).
"""
import argparse
import tempfile
from pathlib import Path

import hybridlm
from hybridlm.eval import evaluate, format_table, load_eval_model, parse_lengths


def random_model_folders(work: Path, train_seq_len: int) -> list[Path]:
    """Two untrained tiny models saved as model folders (stand-ins for `hybridlm export` output)."""
    folders = []
    for preset in ("hybrid-tiny", "transformer-tiny"):
        model = hybridlm.build_model(hybridlm.get_preset(preset), seed=0)
        folders.append(hybridlm.save_pretrained(model, work / preset, tokenizer=hybridlm.ByteTokenizer(),
                                                train_seq_len=train_seq_len))
    return folders


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("models", nargs="*", help="two (or more) model folders")
    parser.add_argument("--task", default="mqar:pairs=4:queries=8")
    parser.add_argument("--lengths", default="1x,2x,4x,8x")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--tiny", action="store_true", help="two random-weight tiny models, few samples")
    args = parser.parse_args()
    folders = [Path(m) for m in args.models]
    samples = args.samples
    if args.tiny:
        folders = random_model_folders(Path(tempfile.mkdtemp(prefix="hybridlm-eval-")), train_seq_len=64)
        samples = 4
    if len(folders) < 2:
        parser.error("give two model folders, or --tiny")
    models = [load_eval_model(str(f)) for f in folders]
    cells = evaluate(models, args.task, parse_lengths(args.lengths), samples=samples, batch_size=4)
    print(format_table(cells))


if __name__ == "__main__":
    main()
