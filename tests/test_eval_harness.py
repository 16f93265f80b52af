"""Scorer, grid runner, table/JSON/plot and the `hybridlm eval` command."""
import json
import math

import pytest
import torch
from torch import nn

from hybridlm.builder import build_model
from hybridlm.builder.io.pretrained import save_pretrained
from hybridlm.cli.main import main
from hybridlm.eval import EvalModel, evaluate, format_table, parse_lengths
from hybridlm.eval.scoring import score_batch
from hybridlm.eval.tasks import make_task
from hybridlm.layouts import load_spec
from hybridlm.tokenizer import ByteTokenizer

BYTE = ByteTokenizer()
TINY = "specs/mamba3-tiny.yaml"


class OracleLM(nn.Module):
    """Predicts the true next token everywhere: one-hot features, identity head."""

    def __init__(self, vocab=256):
        super().__init__()
        self.vocab = vocab
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the scorer a device
        self.output = nn.Identity()

    def features(self, ids):
        return nn.functional.one_hot(ids.roll(-1, dims=1), self.vocab).float() * 10


class ConstantLM(OracleLM):
    """Predicts one fixed token everywhere, whatever the context."""

    def __init__(self, token, vocab=256):
        super().__init__(vocab)
        self.token = token

    def features(self, ids):
        return nn.functional.one_hot(torch.full_like(ids, self.token), self.vocab).float()


def _eval_model(model, name="m", train_seq_len=None):
    return EvalModel(name, model, BYTE, train_seq_len, "test")


@pytest.mark.parametrize("task", ["niah-1", "niah-2", "niah-3", "mqar", "parity", "arith", "arith-brackets"])
def test_a_perfect_model_scores_100(task):
    cells = evaluate([_eval_model(OracleLM())], task, parse_lengths("700"), samples=6, batch_size=4)
    assert cells[0].accuracy == 1.0 and cells[0].scaled_accuracy == 1.0


@pytest.mark.parametrize("task, token", [("mqar", ord("Q")), ("parity", ord("0")), ("arith", ord("3"))])
def test_a_constant_model_scores_chance(task, token):
    cells = evaluate([_eval_model(ConstantLM(token))], task, parse_lengths("128"), samples=400, batch_size=100)
    cell = cells[0]
    sigma = math.sqrt(cell.chance * (1 - cell.chance) / cell.items)
    assert abs(cell.accuracy - cell.chance) < 4 * sigma, (cell.accuracy, cell.chance)
    assert abs(cell.scaled_accuracy) < 4 * sigma / (1 - cell.chance)


def test_a_constant_model_never_finds_a_needle():
    cells = evaluate([_eval_model(ConstantLM(ord("7")))], "niah-1:digits=3", parse_lengths("300"), samples=50)
    assert cells[0].accuracy == 0.0


def test_scores_match_a_plain_forward_and_do_not_depend_on_batching():
    model = build_model(load_spec(TINY), seed=0).eval()
    examples = make_task("mqar:pairs=6", BYTE).examples(96, 5, seed=1) + \
        make_task("parity", BYTE).examples(40, 3, seed=1)  # mixed lengths: padding on the right
    one_by_one = [s for ex in examples for s in score_batch(model, [ex])]
    together = score_batch(model, examples)
    for a, b in zip(one_by_one, together):
        assert [i.correct for i in a.items] == [i.correct for i in b.items]
        torch.testing.assert_close(a.token_nll, b.token_nll, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        for ex, score in zip(examples, together):
            logits = model(torch.tensor([ex.ids]))[0]
            logp = logits.log_softmax(-1)
            for (start, end), item in zip(ex.answers, score.items):
                targets = torch.tensor(ex.ids[start:end])
                pred = logits[start - 1:end - 1].argmax(-1)
                assert item.correct == bool((pred == targets).all())
                nll = -logp[torch.arange(start - 1, end - 1), targets].sum()
                assert item.nll == pytest.approx(float(nll), rel=1e-4, abs=1e-5)


def test_lengths_relative_and_absolute():
    lengths = parse_lengths("1x, 2x,0.5x,4096")
    assert [x.resolve(256, "m") for x in lengths] == [256, 512, 128, 4096]
    with pytest.raises(Exception, match="--train-len"):
        lengths[0].resolve(None, "spec")
    for bad in ("", "x", "-2x", "0", "1.5", "2y"):
        with pytest.raises(Exception, match="length|no length"):
            parse_lengths(bad)


def test_perplexity_buckets_average_to_the_total(tmp_path):
    from hybridlm.eval.tasks.text import stdlib_sentences

    text = tmp_path / "t.txt"
    text.write_text(" ".join(stdlib_sentences())[:20000])
    model = build_model(load_spec(TINY), seed=0).eval()
    cell = evaluate([_eval_model(model)], f"ppl:file={text}", parse_lengths("300"), samples=4)[0]
    assert [b["start"] for b in cell.buckets] == [1, 65, 129, 257]
    widths = [b["end"] - b["start"] for b in cell.buckets]
    mean_log = sum(w * math.log(b["perplexity"]) for w, b in zip(widths, cell.buckets)) / sum(widths)
    assert mean_log == pytest.approx(math.log(cell.perplexity), rel=1e-5)
    assert 100 < cell.perplexity < 1000  # a random byte model: near the vocabulary size


def test_table_rows_models_columns_task_at_length():
    cells = evaluate([_eval_model(OracleLM(), "oracle"), _eval_model(ConstantLM(65), "const")], "mqar,parity",
                     parse_lengths("64,128"), samples=4)
    lines = format_table(cells).splitlines()
    assert lines[0].split() == ["model", "mqar@64", "mqar@128", "parity@64", "parity@128"]
    assert lines[2].split() == ["oracle", "100.0", "100.0", "100.0", "100.0"]
    assert lines[4].split()[0] == "(chance"


def test_eval_command_end_to_end(tmp_path, capsys):
    """The issue's done-when command, on a tiny random model, plus a model folder with 1x/2x."""
    spec = load_spec(TINY)
    folder = tmp_path / "trained"
    save_pretrained(build_model(spec, seed=1), folder, train_seq_len=128)
    out = tmp_path / "out"
    code = main(["eval", TINY, str(folder), "--task", "niah-1,mqar", "--lengths", "256,512", "--samples", "8",
                 "--batch-size", "4", "--out", str(out), "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "niah-1@256" in printed and "mqar@512" in printed and "mamba3-tiny" in printed and "trained" in printed
    doc = json.loads((out / "results.json").read_text())
    assert {(r["model"], r["task"], r["length"]) for r in doc["results"]} == {
        (m, t, n) for m in ("mamba3-tiny", "trained") for t in ("niah-1", "mqar") for n in (256, 512)}
    assert doc["models"][1]["train_seq_len"] == 128
    assert all(0 <= r["accuracy"] <= 1 and r["items"] == (8 if r["task"] == "niah-1" else 128)
               for r in doc["results"])
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    code = main(["eval", str(folder), "--task", "parity", "--lengths", "1x,2x", "--samples", "4",
                 "--out", str(out), "--quiet", "--no-plot"])
    assert code == 0
    doc = json.loads((out / "results.json").read_text())
    assert [r["length"] for r in doc["results"]] == [128, 256]


@pytest.mark.parametrize("args, message", [
    ([TINY, "--task", "niah-1", "--lengths", "1x"], "--train-len"),
    ([TINY, "--task", "nope", "--lengths", "256"], "unknown task"),
    ([TINY, "--task", "niah-1", "--lengths", "two"], "positive token count"),
    (["missing.yaml", "--task", "niah-1", "--lengths", "256"], "missing.yaml"),
])
def test_eval_command_errors_are_one_line(args, message, capsys, tmp_path):
    assert main(["eval", *args, "--out", str(tmp_path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
