"""Training data for torchtitan: task generators, local text / JSON-lines, Hugging Face datasets.

Every source yields rows of exactly ``seq_len`` tokens as ``({"input": ids, "doc_starts": starts},
labels)``. ``doc_starts`` marks where a document (a task example, a text document) begins; the
batch collation turns it into ``cu_seqlens`` on the host (:func:`collate_rows`) so neither Mamba-3
nor attention mixes documents, and no label asks a document to predict the next one. Datasets are
resumable (torchtitan checkpoints their ``state_dict``) and split across data-parallel ranks.
"""
from __future__ import annotations

import json
from array import array
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator

import torch
from torch.distributed.checkpoint.stateful import Stateful
from torch.utils.data import IterableDataset

from hybridlm.errors import HybridLMError, shorten
from hybridlm.eval.tasks import LengthCurriculum, make_task
from hybridlm.eval.tasks.batching import IGNORE_INDEX, next_token_targets
from hybridlm.tokenizer import load_tokenizer

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py")
JSON_SUFFIXES = (".jsonl", ".json")


def build_tokenizer(job_config):
    return load_tokenizer(job_config.hybrid.tokenizer)


def _row(ids: list[int], labels: list[int], starts: list[bool]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    # from packed buffers: torch.tensor(list) walks the Python ints one by one, ≈ 6x slower (a
    # 16 × 2048 batch took ≈ 6 ms on the training process's critical path)
    return ({"input": _longs(ids), "doc_starts": torch.frombuffer(bytearray(starts), dtype=torch.bool)},
            _longs(labels))


def _longs(values: list[int]) -> torch.Tensor:
    return torch.frombuffer(array("q", values), dtype=torch.long)


class TaskRows(IterableDataset, Stateful):
    """Examples of an eval-harness task, one per row, or packed several per row (curriculum)."""

    def __init__(self, task_arg: str, tokenizer, seq_len: int, *, loss_on: str = "answers", seed: int = 0,
                 curriculum: LengthCurriculum | None = None, rows_per_step: int = 1, dp_rank: int = 0,
                 dp_world_size: int = 1):
        self.task = make_task(task_arg, tokenizer)
        self.seq_len, self.loss_on, self.seed, self.curriculum = seq_len, loss_on, seed, curriculum
        if rows_per_step < 1:
            raise HybridLMError(f"rows_per_step must be at least 1, got {rows_per_step}")
        self.rows_per_step = rows_per_step  # this rank's rows per optimizer step (training.local_batch_size)
        self.dp_rank, self.dp_world_size = dp_rank, dp_world_size
        self.index = 0  # next example of this rank (examples are indexed: resuming replays nothing)
        self.rows = 0  # rows this rank has produced: rows // rows_per_step is the training step
        self.pending: list[Any] = []

    @property
    def step(self) -> int:
        """The optimizer step the row being filled belongs to (0-based)."""
        return self.rows // self.rows_per_step

    def _length(self, index: int, rng) -> int:
        if self.curriculum is not None:
            # Stages advance with training steps, as in the paper (10^4 steps per stage), not with
            # examples: packing puts several times more short examples than long ones into a row.
            return self.curriculum.sample_length(self.step, rng)
        # Fill the row: retrieval lengths count tokens; state tracking counts symbols ("... = answer").
        return self.seq_len - 2 if self.task.length_unit == "symbols" else self.seq_len

    def _example(self):
        global_index = self.index * self.dp_world_size + self.dp_rank
        self.index += 1
        return self.task.training_example(global_index, self._length, self.seed)

    def __iter__(self) -> Iterator:
        while True:
            ids: list[int] = []
            labels: list[int] = []
            starts: list[bool] = []
            while True:
                ex = self.pending.pop() if self.pending else self._example()
                if len(ex.ids) > self.seq_len:
                    raise HybridLMError(f"a {self.task.name} example has {len(ex.ids)} tokens, more than "
                                        f"training.seq_len={self.seq_len}; raise seq_len or shorten the task")
                if len(ids) + len(ex.ids) > self.seq_len:
                    self.pending.append(ex)  # starts the next row
                    break
                ids += ex.ids
                labels += next_token_targets(ex, self.loss_on)
                starts += [True] + [False] * (len(ex.ids) - 1)
                if len(ids) == self.seq_len:
                    break
            pad = self.seq_len - len(ids)
            if pad:  # padding is a document of its own, with no labels
                ids += [0] * pad
                labels += [IGNORE_INDEX] * pad
                starts += [True] + [False] * (pad - 1)
            self.rows += 1
            yield _row(ids, labels, starts)

    def state_dict(self) -> dict:
        return {"index": self.index, "rows": self.rows, "pending": [(e.ids, e.answers) for e in self.pending]}

    def load_state_dict(self, state: dict) -> None:
        from hybridlm.eval.tasks import Example

        self.index = state["index"]
        self.rows = state.get("rows", 0)  # checkpoints written before rows were counted
        self.pending = [Example(list(ids), [tuple(a) for a in answers]) for ids, answers in state["pending"]]


def _source_files(path: Path) -> list[Path]:
    if not path.is_dir():
        if not path.is_file():  # /dev/zero, a pipe: reading it would never end
            raise HybridLMError(f"hybrid.data={str(path)!r} is not a regular file or a folder")
        return [path]
    files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES + JSON_SUFFIXES and p.is_file())
    if not files:
        raise HybridLMError(f"{path} holds no {'/'.join(TEXT_SUFFIXES + JSON_SUFFIXES)} files")
    return files


def _json_line_text(file: Path, n: int, raw: bytes) -> str | None:
    """The ``text`` of line ``n`` of a JSON-lines file (None for a blank line); a bad line names file and line."""
    where = f"{file}:{n}"
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise HybridLMError(f"{where}: not UTF-8 text; JSON-lines files must be UTF-8") from None
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise HybridLMError(f"{where}: not valid JSON ({err.msg} at column {err.colno}); "
                            f"each line must be one object such as {{\"text\": \"...\"}}") from None
    if not isinstance(record, dict):
        raise HybridLMError(f"{where}: a JSON-lines record must be an object with a 'text' field, "
                            f"got a {type(record).__name__}")
    if not isinstance(record.get("text"), str):
        got = "no 'text' field" if "text" not in record else f"'text' is a {type(record['text']).__name__}"
        raise HybridLMError(f"{where}: a JSON-lines record needs a 'text' string ({got})")
    return record["text"]


def _documents_from_file(file: Path) -> Iterator[str]:
    try:
        if file.suffix in JSON_SUFFIXES:
            with file.open("rb") as f:
                for n, raw in enumerate(f, 1):
                    text = _json_line_text(file, n, raw)
                    if text is not None:
                        yield text
        else:
            yield file.read_text(encoding="utf-8", errors="replace")
    except OSError as err:
        raise HybridLMError(f"cannot read training data {file}: {err.strerror or err}") from None


def _documents_from_path(path: Path) -> Iterator[str]:
    for file in _source_files(path):
        yield from _documents_from_file(file)


def _documents_from_hub(name: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError as e:
        raise HybridLMError("hf:<name> data needs the `datasets` package: pip install datasets") from e
    repo, _, config = name.partition(":")
    for record in datasets.load_dataset(repo, config or None, split="train", streaming=True):
        yield record["text"]


class TextRows(IterableDataset, Stateful):
    """Documents tokenized and packed back to back into rows; loops forever over the source."""

    def __init__(self, source: str, tokenizer, seq_len: int, *, dp_rank: int = 0, dp_world_size: int = 1):
        self.source, self.tokenizer, self.seq_len = source, tokenizer, seq_len
        self.dp_rank, self.dp_world_size = dp_rank, dp_world_size
        if not source.startswith("hf:") and not Path(source).exists():
            raise HybridLMError(f"hybrid.data={source!r}: no such file or folder (or use task:<name> / hf:<name>)")
        self.doc_index = 0  # documents of this rank consumed so far (in all passes)
        self.buffer: list[int] = []
        self.buffer_starts: list[bool] = []

    def _one_pass(self) -> Iterator[str]:
        docs = _documents_from_hub(self.source[3:]) if self.source.startswith("hf:") \
            else _documents_from_path(Path(self.source))
        return (d for i, d in enumerate(docs) if i % self.dp_world_size == self.dp_rank)

    def _no_text_error(self, documents: int) -> HybridLMError:
        rank = f" for data-parallel rank {self.dp_rank} of {self.dp_world_size}" if self.dp_world_size > 1 else ""
        what = "no documents" if documents == 0 else f"no text: its {documents} document(s) are all empty"
        return HybridLMError(f"hybrid.data={self.source!r} has {what}{rank}; training would wait forever for "
                             f"tokens. Add text to it, or train on another source")

    def _token_documents(self) -> Iterator[list[int]]:
        """This rank's documents as token ids, pass after pass, skipping the ``doc_index`` documents earlier
        runs consumed. A full pass without a token is an error (else the row loop would never end)."""
        to_skip = self.doc_index
        while True:
            documents = tokens = 0
            skipped = False
            for doc in self._one_pass():
                documents += 1
                if to_skip:  # resume: these were consumed before; their tokens are not known here
                    to_skip -= 1
                    skipped = True
                    continue
                ids = self.tokenizer.encode(doc)
                self.doc_index += 1
                tokens += len(ids)
                if ids:
                    yield ids
            if documents == 0 or (tokens == 0 and not skipped):
                raise self._no_text_error(documents)

    def __iter__(self) -> Iterator:
        docs = self._token_documents()
        while True:
            while len(self.buffer) < self.seq_len + 1:
                ids = next(docs)
                self.buffer += ids
                self.buffer_starts += [True] + [False] * (len(ids) - 1)
            ids, starts = self.buffer[:self.seq_len], self.buffer_starts[:self.seq_len]
            nxt, nxt_start = self.buffer[1:self.seq_len + 1], self.buffer_starts[1:self.seq_len + 1]
            labels = [IGNORE_INDEX if s else t for t, s in zip(nxt, nxt_start)]  # never predict across documents
            self.buffer, self.buffer_starts = self.buffer[self.seq_len:], self.buffer_starts[self.seq_len:]
            yield _row(ids, labels, starts)

    def state_dict(self) -> dict:
        return {"doc_index": self.doc_index, "buffer": list(self.buffer), "buffer_starts": list(self.buffer_starts)}

    def load_state_dict(self, state: dict) -> None:
        self.doc_index, self.buffer, self.buffer_starts = state["doc_index"], state["buffer"], state["buffer_starts"]


LOSS_ON_CHOICES = ("answers", "all")


def build_rows(job_config, tokenizer, *, dp_rank: int = 0, dp_world_size: int = 1):
    h = job_config.hybrid
    if h.loss_on not in LOSS_ON_CHOICES:
        raise HybridLMError(f"--hybrid.loss_on {shorten(repr(h.loss_on))}: choose one of "
                            f"{', '.join(LOSS_ON_CHOICES)}")
    seq_len = job_config.training.seq_len
    if h.data.startswith("task:"):
        curriculum = None
        if h.curriculum:  # the paper's four stages, over this run's steps
            curriculum = LengthCurriculum(steps_per_stage=max(1, job_config.training.steps // 4))
        return TaskRows(h.data[5:], tokenizer, seq_len, loss_on=h.loss_on, seed=h.seed, curriculum=curriculum,
                        rows_per_step=job_config.training.local_batch_size, dp_rank=dp_rank,
                        dp_world_size=dp_world_size)
    return TextRows(h.data, tokenizer, seq_len, dp_rank=dp_rank, dp_world_size=dp_world_size)


def collate_rows(rows: list) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Stack rows into a batch; where a row holds more than one document, replace ``doc_starts`` by
    ``cu_seqlens`` over the flattened rows, computed here on the host: the model then needs no
    host sync to learn the document bounds (a batch of one document per row carries neither)."""
    from torch.utils.data import default_collate

    from hybridlm.titan.model import cu_seqlens_from_starts

    inputs, labels = default_collate(rows)
    starts = inputs.pop("doc_starts")
    if bool(starts[:, 1:].any()):
        inputs["cu_seqlens"] = cu_seqlens_from_starts(starts)
    return inputs, labels


def build_dataloader(dp_world_size: int, dp_rank: int, tokenizer, job_config, **unused):
    from torchtitan.components.dataloader import ParallelAwareDataloader

    workers = job_config.training.dataloader.num_workers
    if workers not in (0, 1):
        raise HybridLMError(f"--training.dataloader.num_workers {workers}: hybridlm's rows are one ordered stream "
                            f"a rank, so use 0 (made in the training process) or 1 (one worker process makes "
                            f"the next batches while the GPU trains; the GPU configs' default)")
    rows = build_rows(job_config, tokenizer, dp_rank=dp_rank, dp_world_size=dp_world_size)
    kwargs = {**asdict(job_config.training.dataloader), "batch_size": job_config.training.local_batch_size}
    return ParallelAwareDataloader(rows, dp_rank=dp_rank, dp_world_size=dp_world_size, collate_fn=collate_rows,
                                   **kwargs)
