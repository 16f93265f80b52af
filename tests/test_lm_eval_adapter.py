"""The lm-eval adapter (hybridlm.eval.lm_eval_model) against direct computations from the model's
logits, fully offline: the task is a local YAML file over a local JSON-lines file."""
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# before lm_eval (and through it `datasets`) read them: never reach for the network
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model, model_registry  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from hybridlm import build_model, save_pretrained, spec_from_yaml  # noqa: E402
from hybridlm.eval.lm_eval_model import HybridLMEval, evaluate_lm_eval  # noqa: E402
from hybridlm.testing import randomize_mamba3_  # noqa: E402
from hybridlm.tokenizer import ByteTokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data" / "lm_eval"
TASK = "hybridlm_tiny_mc"
NEWLINE = 10  # the byte tokenizer has no EOS: an empty context is replaced by a newline
TRAIN_SEQ_LEN = 64  # recorded in the test folder; short enough that some task prompts get truncated

# Mamba-3 with several chunks per sequence (so right padding crosses chunk boundaries), RoPE
# attention, SwiGLU; untied head so greedy decoding does not just repeat the last byte.
SPEC = """
version: 1
name: lm-eval-test
vocab_size: 256
d_model: 64
tie_embeddings: false
blocks:
  M: {kind: mamba3, d_state: 16, headdim: 16, chunk_size: 8, out_norm: pregate_grouped}
  A: {kind: attention, n_heads: 4, n_kv_heads: 2, position: rope}
  F: {kind: swiglu, hidden: 128}
pattern: "M F A F M F"
"""


@pytest.fixture(scope="module")
def model():
    model = build_model(spec_from_yaml(SPEC), seed=0)
    with torch.no_grad():
        for layer in model.layers:
            if hasattr(layer.mixer, "B_norm"):
                randomize_mamba3_(layer.mixer, seed=layer.mixer.layer_idx)
        # peakier predictions than the init's near-uniform ones, so scores differ clearly
        model.tok_embeddings.weight.mul_(3)
        model.output.weight.mul_(3)
    return model.eval()


@pytest.fixture(scope="module")
def folder(model, tmp_path_factory):
    return save_pretrained(model, tmp_path_factory.mktemp("lm_eval_model"), train_seq_len=TRAIN_SEQ_LEN)


def requests(kind, args):
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


@torch.no_grad()
def direct_loglikelihood(model, context: list[int], continuation: list[int], max_length: int):
    """Sum of log_softmax over the continuation's tokens from one unbatched forward pass over the
    last max_length + 1 tokens (the last token is only predicted), and whether each is the argmax."""
    ids = (context + continuation)[-(max_length + 1):]
    logp = model(torch.tensor([ids[:-1]]))[0].float().log_softmax(-1).double()
    positions = range(len(ids) - 1 - len(continuation), len(ids) - 1)
    total = sum(float(logp[p, t]) for p, t in zip(positions, continuation))
    greedy = all(int(logp[p].argmax()) == t for p, t in zip(positions, continuation))
    return total, greedy


def task_docs():
    return [json.loads(line) for line in (DATA / "tiny_mc.jsonl").read_text().splitlines() if line.strip()]


def direct_accuracy(model, max_length):
    """The task's accuracy computed here: prompt from the YAML's doc_to_text, lm-eval's default
    " " between prompt and choice, the choice with the highest loglikelihood wins (first on ties)."""
    correct = []
    for doc in task_docs():
        context = list(f"Question: {doc['question']}\nAnswer:".encode())
        scores = [direct_loglikelihood(model, context, list(f" {c}".encode()), max_length)[0] for c in doc["choices"]]
        correct.append(float(max(range(len(scores)), key=lambda i: (scores[i], -i)) == doc["answer"]))
    return sum(correct) / len(correct)


# -- loglikelihood --------------------------------------------------------------------------------------

LL_CASES = [
    ("Hello", " world"),
    ("", "abc"),                                    # empty context: conditioned on the prefix token
    ("The answer is ", "forty-two"),                # trailing space moves to the continuation
    ("Question: what is 2+2?\nAnswer:", " 4"),
    ("x" * 50 + "A long context that is cut", " on the left"),   # longer than max_length=48
    ("q", " a rather longer continuation"),
    ("A somewhat longer context than the others here", " ok"),
]


def expected_tokens(context: str, continuation: str):
    """The tokenization the adapter promises, written out for the byte tokenizer."""
    if context == "":
        return [NEWLINE], list(continuation.encode())
    stripped = context.rstrip()
    return list(stripped.encode()), list((context[len(stripped):] + continuation).encode())


def test_loglikelihood_equals_direct_logits_for_every_batch_size(model):
    expected = [direct_loglikelihood(model, *expected_tokens(c, x), max_length=48) for c, x in LL_CASES]
    by_batch_size = {}
    for batch_size in (1, 4):
        lm = HybridLMEval(model, batch_size=batch_size, max_length=48)
        by_batch_size[batch_size] = got = lm.loglikelihood(requests("loglikelihood", LL_CASES), disable_tqdm=True)
        for (logp, greedy), (want_logp, want_greedy), case in zip(got, expected, LL_CASES):
            assert logp == pytest.approx(want_logp, abs=1e-5), case
            assert greedy == want_greedy, case
    for (a, _), (b, _) in zip(by_batch_size[1], by_batch_size[4]):
        assert a == pytest.approx(b, abs=1e-5)


def test_is_greedy_true_exactly_for_the_models_own_greedy_continuation(model):
    lm = HybridLMEval(model, batch_size=2, max_length=64)
    context = list(b"Hello there")
    greedy = model.generate(torch.tensor([context]), 4, temperature=0)[0, len(context):].tolist()
    changed_last = greedy[:-1] + [(greedy[-1] + 1) % 256]
    changed_first = [(greedy[0] + 1) % 256] + greedy[1:]
    results = lm.score_tokens([(context, greedy), (context, changed_last), (context, changed_first)])
    assert [g for _, g in results] == [True, False, False]
    # the greedy continuation is also the likeliest of the three
    assert results[0][0] > max(results[1][0], results[2][0])
    assert results[0][0] == pytest.approx(direct_loglikelihood(model, context, greedy, 64)[0], abs=1e-5)


# -- loglikelihood_rolling ------------------------------------------------------------------------------

def test_rolling_equals_full_sequence_nll_when_the_text_fits(model):
    text = "A short document, shorter than max_length."
    tokens = list(text.encode())
    lm = HybridLMEval(model, batch_size=4, max_length=64)
    (got,) = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(text,)]), disable_tqdm=True)
    assert got == pytest.approx(direct_loglikelihood(model, [NEWLINE], tokens, 64)[0], abs=1e-5)


def test_rolling_scores_every_token_once_in_disjoint_windows(model):
    long_text = "Several windows: " + "the quick brown fox jumps over the lazy dog; " * 3
    texts = [long_text, "tiny", ""]
    lm = HybridLMEval(model, batch_size=3, max_length=32)
    got = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(t,) for t in texts]), disable_tqdm=True)
    for text, value in zip(texts, got):
        tokens = list(text.encode())
        # window k predicts tokens[32k : 32k + 32] given the token before it; the last, shorter
        # window gets as many earlier tokens as fit in 32 (lm-eval's rolling windows)
        expected = sum(direct_loglikelihood(model, tokens[max(0, min(s + 32, len(tokens)) - 33):s] if s else [NEWLINE],
                                            tokens[s:s + 32], 32)[0]
                       for s in range(0, len(tokens), 32))
        assert value == pytest.approx(expected, abs=1e-5), text[:20]
    assert len(long_text) > 4 * 32 and got[2] == 0.0
    # more context than one token changes the score: the windows really are separate
    assert got[0] != pytest.approx(direct_loglikelihood(model, [NEWLINE], list(long_text.encode()), 200)[0], abs=1e-3)


# -- generate_until -------------------------------------------------------------------------------------

def test_generate_until_matches_model_generate_and_stops_at_the_stop_string(model, monkeypatch):
    prompt = "Question: What is two plus two?\nAnswer:"
    other = "Another prompt"
    ref = model.generate(torch.tensor([list(prompt.encode())]), 40, temperature=0)[0, len(prompt):].tolist()
    ref_other = model.generate(torch.tensor([list(other.encode())]), 40, temperature=0)[0, len(other):].tolist()
    # stop at the first printable ASCII byte that appears from the 4th generated token on
    stop_at = next(p for p in range(3, len(ref)) if 32 < ref[p] < 127 and ref[p] not in ref[:p])
    stop = chr(ref[stop_at])
    decode = ByteTokenizer().decode

    calls = []
    features = model.features
    monkeypatch.setattr(model, "features", lambda *a, **k: calls.append(1) or features(*a, **k))
    lm = HybridLMEval(model, batch_size=4, max_length=128)
    out = lm.generate_until(requests("generate_until", [
        (prompt, {"until": [stop], "max_gen_toks": 40}),
        (other, {"until": [], "max_gen_toks": 7}),
    ]), disable_tqdm=True)
    assert out == [decode(ref[:stop_at]), decode(ref_other[:7])]
    # one prefill and one step per token after the first, for each prompt: generation stopped early
    assert len(calls) == (1 + stop_at) + (1 + 6)


def test_generate_until_left_truncates_and_samples_like_model_generate(model):
    lm = HybridLMEval(model, batch_size=2, max_length=32, seed=3)
    context = "This context is longer than max_length minus max_gen_toks."
    kept = list(context.encode())[-(32 - 8):]
    greedy = model.generate(torch.tensor([kept]), 8, temperature=0)[0, len(kept):].tolist()
    sampled = model.generate(torch.tensor([kept]), 8, temperature=0.7,
                             generator=torch.Generator().manual_seed(3))[0, len(kept):].tolist()
    out = lm.generate_until(requests("generate_until", [
        (context, {"until": [], "max_gen_toks": 8}),
    ]), disable_tqdm=True)
    assert out == [ByteTokenizer().decode(greedy)]
    out = lm.generate_until(requests("generate_until", [
        (context, {"until": [], "max_gen_toks": 8, "do_sample": True, "temperature": 0.7}),
    ]), disable_tqdm=True)
    assert out == [ByteTokenizer().decode(sampled)]


# -- construction, registration, end to end -------------------------------------------------------------

def test_registered_by_name_and_built_from_lm_eval_arg_strings(folder, model):
    assert get_model("hybridlm") is HybridLMEval
    assert "hf" in model_registry  # lm-eval's own models are still there
    lm = get_model("hybridlm").create_from_arg_string(f"pretrained={folder}", {"device": "cpu", "batch_size": 2})
    assert lm.max_length == TRAIN_SEQ_LEN and lm.batch_size == 2
    assert torch.equal(lm.model.output.weight, model.output.weight)
    random = HybridLMEval.create_from_arg_string("spec=mamba3-tiny,seed=1,max_length=32,dtype=float32")
    assert random.model.spec.name == "mamba3-tiny" and random.max_length == 32
    with pytest.raises(TypeError, match="unknown model_args.*max_lenght"):
        HybridLMEval(spec="mamba3-tiny", max_lenght=32)


def test_simple_evaluate_accuracy_equals_accuracy_from_direct_loglikelihoods(folder, model, monkeypatch):
    monkeypatch.chdir(DATA)  # the task's data_files path is relative
    results = evaluate_lm_eval(folder, [TASK], device="cpu", batch_size=4, log_samples=True,
                               task_manager=TaskManager(include_path=str(DATA), include_defaults=False))
    acc = results["results"][TASK]["acc,none"]
    assert 0.0 <= acc <= 1.0
    assert acc == pytest.approx(direct_accuracy(model, TRAIN_SEQ_LEN), abs=1e-9)
    # and each logged choice score is the direct one
    docs = task_docs()
    for sample in results["samples"][TASK]:
        doc = docs[sample["doc_id"]]
        context = list(f"Question: {doc['question']}\nAnswer:".encode())
        for choice, (logp, _) in zip(doc["choices"], (r[0] for r in sample["resps"])):
            want = direct_loglikelihood(model, context, list(f" {choice}".encode()), TRAIN_SEQ_LEN)[0]
            assert logp == pytest.approx(want, abs=1e-5)


# `python -m hybridlm.eval.lm_eval_model ARGS`, run the way `python -m` runs it (the module executed
# as __main__), except that lm-eval's task index skips its thousands of built-in task files (8+ s
# of YAML parsing) that the local task does not need.
RUN_AS_MAIN = """
import runpy, sys
import lm_eval.tasks.manager as manager
original_init = manager.TaskManager.__init__
def local_tasks_only(self, *args, include_defaults=True, **kwargs):
    original_init(self, *args, include_defaults=False, **kwargs)
manager.TaskManager.__init__ = local_tasks_only
sys.argv = ["lm_eval_model", *sys.argv[1:]]
runpy.run_module("hybridlm.eval.lm_eval_model", run_name="__main__", alter_sys=True)
"""


def test_command_line_runs_the_local_task_on_a_model_folder(folder, model, tmp_path):
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-c", RUN_AS_MAIN, "--model", "hybridlm",
         "--model_args", f"pretrained={folder}", "--device", "cpu", "--batch_size", "4",
         "--tasks", TASK, "--include_path", str(DATA), "--output_path", str(tmp_path / "out")],
        cwd=DATA, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert TASK in proc.stdout
    (results_file,) = (tmp_path / "out").rglob("results_*.json")
    acc = json.loads(results_file.read_text())["results"][TASK]["acc,none"]
    assert acc == pytest.approx(direct_accuracy(model, TRAIN_SEQ_LEN), abs=1e-9)


def test_import_without_lm_eval_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what `import lm_eval` sees when it is not installed
    monkeypatch.delitem(sys.modules, "hybridlm.eval.lm_eval_model")
    with pytest.raises(ImportError) as info:
        importlib.import_module("hybridlm.eval.lm_eval_model")
    assert str(info.value) == ("hybridlm.eval.lm_eval_model needs lm-evaluation-harness 0.4.13: "
                               "pip install 'hybridlm[lm-eval]'")
