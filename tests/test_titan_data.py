"""Training rows: exact shapes, document boundaries (no leakage), resumable state, curriculum packing."""
from itertools import islice
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("torchtitan")

import hybridlm  # noqa: E402
from hybridlm.eval.tasks.batching import IGNORE_INDEX  # noqa: E402
from hybridlm.eval.tasks.state_tracking import LengthCurriculum  # noqa: E402
from hybridlm.titan.data import TaskRows, TextRows, build_rows  # noqa: E402
from hybridlm.titan.model import TitanHybridLM, cu_seqlens_from_starts  # noqa: E402

BYTE = hybridlm.ByteTokenizer()


def _rows(dataset, n):
    return list(islice(iter(dataset), n))


def test_task_rows_hold_one_example_and_answer_labels():
    rows = _rows(TaskRows("mqar:pairs=4", BYTE, 64), 3)
    for inputs, labels in rows:
        assert inputs["input"].shape == labels.shape == (64,)
        assert inputs["doc_starts"].tolist() == [True] + [False] * 63
        scored = (labels != IGNORE_INDEX).nonzero().flatten()
        assert len(scored) == 4
        assert torch.equal(labels[scored], inputs["input"][scored + 1])


def test_curriculum_rows_pack_examples_without_crossing_them():
    cur = LengthCurriculum(first_max=20, last_max=20, stages=1)
    dataset = TaskRows("parity", BYTE, 64, curriculum=cur, loss_on="all")
    for inputs, labels in _rows(dataset, 5):
        starts = inputs["doc_starts"].nonzero().flatten().tolist()
        assert len(starts) >= 2  # several examples (and maybe padding) per row
        for s in starts[1:]:
            assert labels[s - 1] == IGNORE_INDEX  # the last token of a document predicts nothing
        ids = inputs["input"].tolist()
        for a, b in zip(starts, starts[1:] + [64]):
            doc = bytes(ids[a:b]).decode()
            if doc.strip("\0"):
                bits, answer = doc.split("=")
                assert int(answer) == bits.count("1") % 2


def test_task_rows_resume_where_they_stopped():
    dataset = TaskRows("parity", BYTE, 40, curriculum=LengthCurriculum(first_max=12, last_max=12, stages=1))
    it = iter(dataset)
    list(islice(it, 3))
    state = dataset.state_dict()
    expected = list(islice(it, 3))
    fresh = TaskRows("parity", BYTE, 40, curriculum=LengthCurriculum(first_max=12, last_max=12, stages=1))
    fresh.load_state_dict(state)
    got = list(islice(iter(fresh), 3))
    assert all(torch.equal(a[0]["input"], b[0]["input"]) and torch.equal(a[1], b[1]) for a, b in zip(expected, got))


def test_ranks_see_different_examples():
    a = _rows(TaskRows("mqar:pairs=4", BYTE, 64, dp_rank=0, dp_world_size=2), 2)
    b = _rows(TaskRows("mqar:pairs=4", BYTE, 64, dp_rank=1, dp_world_size=2), 2)
    assert not torch.equal(a[0][0]["input"], b[0][0]["input"])


def test_text_rows_from_jsonl_mark_documents_and_resume(tmp_path):
    docs = ["alpha beta gamma " * 3, "delta epsilon", "zeta eta theta iota " * 4]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join('{"text": "%s"}' % d for d in docs) + "\n")
    dataset = TextRows(str(path), BYTE, 32)
    it = iter(dataset)
    rows = list(islice(it, 4))
    stream = "".join(docs).encode()
    doc_ends = [len("".join(docs[:i + 1]).encode()) for i in range(len(docs))]
    for i, (inputs, labels) in enumerate(rows[:3]):
        offset = 32 * i
        assert bytes(inputs["input"].tolist()) == (stream + stream)[offset:offset + 32]
        for t in range(32):
            if (offset + t + 1) in doc_ends:  # the next token starts another document
                assert labels[t] == IGNORE_INDEX
            elif offset + t + 1 < len(stream):
                assert labels[t] == stream[offset + t + 1]
    state = dataset.state_dict()
    nxt = next(it)
    again = TextRows(str(path), BYTE, 32)
    again.load_state_dict(state)
    assert torch.equal(next(iter(again))[0]["input"], nxt[0]["input"])


def test_missing_text_source_is_one_clear_error(tmp_path):
    with pytest.raises(hybridlm.HybridLMError, match="no such file"):
        TextRows(str(tmp_path / "nope.txt"), BYTE, 16)


def test_doc_starts_give_no_cross_document_leakage():
    """A packed row == its documents run one by one, through Mamba-3 and attention."""
    from hybridlm.titan.args import HybridModelArgs

    spec = hybridlm.load_spec("specs/demo/hybrid-demo.yaml")
    model = TitanHybridLM(HybridModelArgs(spec=spec.to_dict(exclude_defaults=False)))
    model.init_weights()
    model.eval()
    ids = torch.randint(0, 256, (2, 40))
    starts = torch.zeros(2, 40, dtype=torch.bool)
    starts[0, 15] = starts[1, 7] = starts[1, 30] = True
    assert cu_seqlens_from_starts(starts).tolist() == [0, 15, 40, 47, 70, 80]
    with torch.no_grad():
        packed = model(ids, doc_starts=starts)
        pieces = [(0, 0, 15), (0, 15, 40), (1, 0, 7), (1, 7, 30), (1, 30, 40)]
        for row, a, b in pieces:
            alone = model(ids[row:row + 1, a:b])
            torch.testing.assert_close(packed[row, a:b], alone[0], rtol=1e-4, atol=1e-5)
        assert not torch.allclose(model(ids)[0, 15:40], packed[0, 15:40], atol=1e-3)


def test_build_rows_reads_the_hybrid_section(tmp_path):
    config = SimpleNamespace(hybrid=SimpleNamespace(data="task:parity", loss_on="answers", seed=3, curriculum=True),
                             training=SimpleNamespace(seq_len=200, steps=8, local_batch_size=2))
    rows = build_rows(config, BYTE)
    # four stages over the run's steps; the stage follows the step, i.e. rows / local_batch_size
    assert isinstance(rows, TaskRows) and rows.curriculum.steps_per_stage == 2 and rows.seed == 3
    assert rows.rows_per_step == 2


def _documents(row) -> list[str]:
    ids = row[0]["input"].tolist()
    starts = row[0]["doc_starts"].nonzero().flatten().tolist() + [len(ids)]
    docs = [bytes(ids[a:b]).decode() for a, b in zip(starts, starts[1:])]
    return [d for d in docs if d.strip("\0")]


def test_curriculum_stage_follows_training_steps_not_examples():
    """Stage 1 (lengths 3..10) for the rows of step 0, stage 2 (3..30) from step 1 on, however many
    short examples a row packs."""
    cur = LengthCurriculum(min_length=3, first_max=10, last_max=30, stages=2, steps_per_stage=1)
    dataset = TaskRows("parity", BYTE, 64, curriculum=cur, rows_per_step=3)
    rows = _rows(dataset, 9)
    lengths = [[len(d.split("=")[0]) for d in _documents(r)] for r in rows]
    assert all(3 <= n <= 10 for row in lengths[:3] for n in row)
    assert max(n for row in lengths[3:] for n in row) > 10
    assert all(n <= 30 for row in lengths for n in row)
    assert dataset.state_dict()["rows"] == 9 and dataset.step == 3


def test_text_rows_with_a_tokenizer_file(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"[UNK]": 0, "alpha": 1, "beta": 2, "gamma": 3, "delta": 4}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    file_tok = hybridlm.load_tokenizer(tmp_path / "tokenizer.json")
    (tmp_path / "a.txt").write_text("alpha beta gamma")
    (tmp_path / "b.txt").write_text("delta delta alpha beta")
    inputs, labels = next(iter(TextRows(str(tmp_path), file_tok, 5)))
    assert inputs["input"].tolist() == [1, 2, 3, 4, 4]
    assert inputs["doc_starts"].tolist() == [True, False, False, True, False]
    assert labels.tolist() == [2, 3, IGNORE_INDEX, 4, 1]


def test_hybrid_backend_flag_sets_the_backend_of_auto_blocks(monkeypatch):
    """--hybrid.backend reaches the blocks through the spec (not the environment): the blocks of a
    kind that has a backend of that name and leave it on auto; the recorded spec stays as given."""
    from hybridlm.blocks import Attention, Mamba3
    from hybridlm.titan.args import HybridModelArgs

    monkeypatch.delenv("HYBRIDLM_BACKEND", raising=False)
    config = SimpleNamespace(
        hybrid=SimpleNamespace(spec="specs/demo/hybrid-demo.yaml", backend="sequential", seed=0),
        training=SimpleNamespace(seq_len=64),
        parallelism=SimpleNamespace(context_parallel_degree=1, pipeline_parallel_degree=1))
    args = HybridModelArgs()
    args.update_from_config(config)
    assert args.max_seq_len == 64 and args.n_layers == 8 and args.spec["name"] == "hybrid-demo"
    import os

    assert "HYBRIDLM_BACKEND" not in os.environ
    assert {b["backend"] for b in args.spec["blocks"].values() if "backend" in b} == {"auto"}
    model = hybridlm.build_model(args.model_spec())
    assert {m.backend for m in model.modules() if isinstance(m, Mamba3)} == {"sequential"}
    assert {m.backend for m in model.modules() if isinstance(m, Attention)} == {None}  # attention has none of that name
    config.hybrid.backend = "sdpa"
    args.update_from_config(config)
    model = hybridlm.build_model(args.model_spec())
    assert {m.backend for m in model.modules() if isinstance(m, Mamba3)} == {None}
    assert {m.backend for m in model.modules() if isinstance(m, Attention)} == {"sdpa"}
    config.hybrid.backend = "tritn"
    with pytest.raises(hybridlm.HybridLMError, match="'tritn' is no registered kernel backend"):
        HybridModelArgs().update_from_config(config)
    config.hybrid.backend = ""
    config.parallelism.context_parallel_degree = 2
    with pytest.raises(hybridlm.HybridLMError, match="context parallelism"):
        HybridModelArgs().update_from_config(config)


def _loader(workers: int, data: str = "task:parity"):
    from torchtitan.config.job_config import DataLoader

    from hybridlm.titan.data import build_dataloader

    config = SimpleNamespace(hybrid=SimpleNamespace(data=data, loss_on="answers", seed=0, curriculum=True),
                             training=SimpleNamespace(seq_len=200, steps=8, local_batch_size=2,
                                                      dataloader=DataLoader(num_workers=workers)))
    return build_dataloader(1, 0, BYTE, config)


def _same_batches(a, b) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x[0]["input"], y[0]["input"]) and torch.equal(x[1], y[1])
        and torch.equal(x[0].get("cu_seqlens", torch.zeros(0)), y[0].get("cu_seqlens", torch.zeros(0)))
        for x, y in zip(a, b))


def test_a_worker_process_makes_the_same_batches_and_resumes():
    """The GPU configs make batches in one worker process (num_workers = 1): the same batches as in
    the training process, curriculum stages included, and a resume mid-run continues the stream
    (the loader's state holds the worker's, not the prefetched batches')."""
    expected = list(islice(iter(_loader(0)), 6))
    loader = _loader(1)
    it = iter(loader)
    first = list(islice(it, 3))
    state = loader.state_dict()
    assert _same_batches(first, expected[:3])
    resumed = _loader(1)
    resumed.load_state_dict(state)
    assert _same_batches(list(islice(iter(resumed), 3)), expected[3:])


def test_more_than_one_worker_is_one_clear_error():
    with pytest.raises(hybridlm.HybridLMError, match="num_workers 2.*use 0.*or 1"):
        _loader(2)
