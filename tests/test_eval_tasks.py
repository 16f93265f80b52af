"""Task generators: exact lengths, recoverable answers, needle depth, determinism, errors."""
import random
import re

import pytest

from hybridlm.eval.tasks import TASKS, LengthCurriculum, TaskError, collate, make_task, parse_tasks, position_buckets
from hybridlm.eval.tasks.batching import IGNORE_INDEX
from hybridlm.eval.tasks.state_tracking import evaluate_mod, random_expression
from hybridlm.eval.tasks.text import NOISE_SENTENCES, stdlib_sentences
from hybridlm.tokenizer import ByteTokenizer, FileTokenizer

BYTE = ByteTokenizer()
QUERY_1 = BYTE.encode(" What is the special magic number for x mentioned in the provided text?"
                      " The special magic number for x mentioned in the provided text is: ")
NEEDLE_VALUE = re.compile(r"for (?P<key>[a-z ]+?) is:? (?P<value>[0-9a-f-]+)\.")


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """A small BPE tokenizer trained here on Python's docstrings (no download)."""
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=600, special_tokens=["[UNK]"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(stdlib_sentences()) + list(NOISE_SENTENCES) * 50, trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return FileTokenizer(path)


def _prompt_text(tok, ex):
    return tok.decode(ex.ids[:ex.answers[0][0]])


@pytest.mark.parametrize("name", ["niah-1", "niah-2", "niah-3"])
@pytest.mark.parametrize("tokenizer", ["byte", "bpe"])
def test_niah_exact_length_and_answer_in_prompt(name, tokenizer, bpe):
    tok = BYTE if tokenizer == "byte" else bpe
    task = make_task(name, tok)
    for length in (700, 1024, 1500):
        for ex in task.examples(length, 5, seed=3):
            assert len(ex) == length
            assert len(ex.answers) == 1
            prompt = _prompt_text(tok, ex)
            answer = tok.decode(ex.answer_ids()[0])
            assert answer == ex.meta["value"]
            # The needle for the queried key gives the answer; distractor needles name other keys.
            found = {m["key"]: m["value"] for m in NEEDLE_VALUE.finditer(prompt)}
            assert found[ex.meta["key"]] == answer
            assert prompt.count(f"for {ex.meta['key']} is") == 1
            assert len(found) == 1 + task.opt["distractors"]


def test_niah_options_change_the_needle():
    ex = make_task("niah-1:digits=4:template=short", BYTE).examples(256, 1)[0]
    assert re.fullmatch(r"\d{4}", ex.meta["value"])
    assert "The magic number for" in BYTE.decode(ex.ids)
    uuid = make_task("niah-3:digits=8:distractors=2:template=short", BYTE).examples(400, 1)[0].meta["value"]
    assert re.fullmatch(r"[0-9a-f]{8}", uuid)


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("name", ["niah-1", "niah-2"])
def test_needle_sits_at_the_requested_depth(name, depth):
    task = make_task(f"{name}:depth={depth}", BYTE)
    for ex in task.examples(2048, 4, seed=1):
        m = ex.meta
        query_len = len(QUERY_1) + 2 * (len(m["key"]) - 1)
        # The needle text is where meta says, and its position is within one sentence of the depth.
        needle = BYTE.decode(ex.ids[m["needle_start"]:m["needle_start"] + m["needle_len"]])
        assert needle.strip().startswith("One of the special magic numbers for")
        # Within one sentence: noise sentences are ~20 bytes, docstring sentences up to 300.
        tolerance = 0.15 if name == "niah-2" else 0.02
        assert abs(m["needle_depth"] - depth) <= tolerance
        haystack_len = m["context_len"] - m["needle_len"] - query_len
        assert m["needle_start"] == pytest.approx(m["needle_depth"] * haystack_len, abs=1)


def test_niah_default_depths_sweep_the_context():
    depths = [ex.meta["needle_depth"] for ex in make_task("niah-1", BYTE).examples(1024, 5)]
    assert depths[0] == 0 and depths[-1] == 1 and depths == sorted(depths)


@pytest.mark.parametrize("tokenizer", ["byte", "bpe"])
def test_mqar_queries_ask_for_pairs_in_the_prompt(tokenizer, bpe):
    tok = BYTE if tokenizer == "byte" else bpe
    task = make_task("mqar:pairs=12:queries=6", tok)
    for length in (64, 257, 1000):
        for ex in task.examples(length, 4, seed=2):
            assert len(ex) == length and len(ex.answers) == 6
            pairs = dict(zip(ex.ids[0:24:2], ex.ids[1:24:2]))
            assert len(pairs) == 12  # distinct keys
            for start, end in ex.answers:
                assert end == start + 1 and start > 24
                key = ex.ids[start - 1]
                assert pairs[key] == ex.ids[start]
            query_keys = [ex.ids[s - 1] for s, _ in ex.answers]
            assert len(set(query_keys)) == 6
            # Outside the pairs and queries there are only noise tokens, never a key or a value.
            scored = {s for s, _ in ex.answers} | {s - 1 for s, _ in ex.answers}
            rest = [t for i, t in enumerate(ex.ids[24:], 24) if i not in scored]
            assert not set(rest) & (set(task.keys) | set(task.values))
    assert task.chance() == pytest.approx(1 / 26)


def test_state_tracking_answers_are_right():
    for name, symbols_ok in [("parity", "01"), ("arith", "01234+-*"), ("arith-brackets", "01234+-*()"),
                             ("arith-sum", "01234+-"), ("arith-brackets-sum", "01234+-()"),
                             ("arith:operators=*", "01234*-")]:  # '-': an even length's unary minus
        task = make_task(name, BYTE)
        for length in (1, 2, 3, 10, 41, 256):
            for ex in task.examples(length, 6, seed=length):
                text = BYTE.decode(ex.ids)
                expr, answer = text[:-2], text[-1]
                assert text[-2] == "=" and len(expr) == length and set(expr) <= set(symbols_ok)
                if name == "parity":
                    assert int(answer) == expr.count("1") % 2
                else:  # Python's own evaluator, independent of ours
                    assert int(answer) == eval(expr.replace("--", "- -").replace("--", "- -")) % 5
                assert ex.answers == [(len(ex) - 1, len(ex))]


def test_arithmetic_operator_sets():
    """The default draws every operator (so arith's examples are those it had before the option), the -sum
    variants + and - only, and one bad set one clear error."""
    seen = lambda arg, length: set("".join(BYTE.decode(e.ids)[:-2] for e in make_task(arg, BYTE).examples(  # noqa: E731
        length, 40)))
    assert seen("arith", 41) >= set("+-*") and seen("arith-brackets", 41) >= set("+-*()")
    assert seen("arith-sum", 41) == set("01234+-") and seen("arith-brackets-sum", 41) == set("01234+-()")
    assert "*" in seen("arith-sum:operators=+*", 41)
    for bad in ("+/", "", "++"):
        with pytest.raises(TaskError, match="operators=.*give one or more of"):
            make_task(f"arith:operators={bad}", BYTE)
    assert make_task("arith-sum", BYTE).symbols() == make_task("arith", BYTE).symbols()  # one vocabulary


def test_random_expressions_have_exact_length_and_match_python():
    rng = random.Random(0)
    for n in range(1, 300):
        expr = random_expression(n, rng)
        assert len(expr) == n
        assert evaluate_mod(expr) == eval("".join(expr).replace("--", "- -").replace("--", "- -")) % 5


def test_curriculum_follows_the_paper():
    cur = LengthCurriculum()
    assert [cur.max_length(s) for s in (0, 9_999, 10_000, 20_000, 30_000, 99_999)] == [40, 40, 80, 120, 160, 160]
    rng = random.Random(0)
    lengths = [cur.sample_length(0, rng) for _ in range(2000)]
    assert min(lengths) == 3 and max(lengths) == 40
    assert cur.total_steps == 40_000


def test_examples_are_deterministic_per_seed():
    for name in TASKS:
        if name == "ppl":
            continue
        task = make_task(name, BYTE)
        a = task.examples(1000, 3, seed=7)
        b = make_task(name, BYTE).examples(1000, 3, seed=7)
        c = task.examples(1000, 3, seed=8)
        assert [x.ids for x in a] == [x.ids for x in b]
        assert [x.ids for x in a] != [x.ids for x in c]


def test_perplexity_windows(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("".join(stdlib_sentences())[:5000])
    task = make_task(f"ppl:file={path}", BYTE)
    ex = task.examples(1000, 7)
    assert [len(e) for e in ex] == [1000] * 7
    assert ex[1].ids == list(path.read_bytes()[1000:2000])
    assert ex[5].ids == ex[0].ids  # five windows, then wrap around
    assert position_buckets(1000) == [(0, 64), (64, 128), (128, 256), (256, 512), (512, 1000)]
    with pytest.raises(TaskError, match="fewer than length"):
        task.examples(6000, 1)


@pytest.mark.parametrize("arg, message", [
    ("nope", "unknown task 'nope'"),
    ("niah-1:digits", "must look like key=value"),
    ("niah-1:color=red", "unknown option"),
    ("niah-1:digits=abc", "not a valid int"),
    ("niah-1:depth=1.5", r"depth=1.5 must be in \[0, 1\]"),
    ("niah-2:haystack=web", "choose one of"),
    ("mqar:pairs=40", "pairs=40 must be in"),
    ("mqar:pairs=4:queries=0", "queries=0"),
    ("ppl", "needs a text file"),
])
def test_bad_task_arguments_name_the_problem(arg, message):
    with pytest.raises(TaskError, match=message):
        make_task(arg, BYTE)


def test_too_short_lengths_say_how_long():
    with pytest.raises(TaskError, match="ask for at least"):
        make_task("niah-1", BYTE).examples(100, 1)
    with pytest.raises(TaskError, match="at least 64"):
        make_task("mqar", BYTE).examples(63, 1)


def test_parse_tasks_splits_options():
    assert parse_tasks("niah-1, mqar:pairs=8:queries=4") == [("niah-1", {}), ("mqar", {"pairs": "8", "queries": "4"})]


def test_collate_aligns_labels_with_logits():
    ex = make_task("mqar:pairs=4", BYTE).examples(32, 2)
    batch = collate(ex)
    for b, e in enumerate(ex):
        scored = [(t, batch["labels"][b, t].item()) for t in range(32) if batch["labels"][b, t] != IGNORE_INDEX]
        assert scored == [(s - 1, e.ids[s]) for s, _ in e.answers]
    short = make_task("parity", BYTE).examples(5, 1) + make_task("parity", BYTE).examples(9, 1)
    padded = collate(short, loss_on="all")
    assert padded["input_ids"].shape == (2, 11)
    assert padded["labels"][0, 6:].tolist() == [IGNORE_INDEX] * 5  # last real token and the padding
    assert padded["labels"][1, :10].tolist() == short[1].ids[1:]
    packed = collate(short, loss_on="all", packed=True)
    assert packed["cu_seqlens"].tolist() == [0, 7, 18]
    assert packed["labels"][0, 6].item() == IGNORE_INDEX  # no label crosses the boundary


def test_training_streams_are_resumable_and_follow_a_curriculum():
    from itertools import islice

    task = make_task("parity", BYTE)
    cur = LengthCurriculum(steps_per_stage=4, stages=2, first_max=10, last_max=20)
    lengths = lambda i, rng: cur.sample_length(i, rng)  # noqa: E731  (index = step here)
    full = list(islice(task.stream(lengths, seed=1), 10))
    resumed = list(islice(task.stream(lengths, seed=1, start=6), 4))
    assert [e.ids for e in full[6:]] == [e.ids for e in resumed]
    assert all(3 <= len(e) - 2 <= 10 for e in full[:4]) and all(3 <= len(e) - 2 <= 20 for e in full[4:])
    niah = list(islice(make_task("niah-1", BYTE).stream(400), 3))
    assert all(len(e) == 400 for e in niah) and len({e.meta["needle_depth"] for e in niah}) == 3
