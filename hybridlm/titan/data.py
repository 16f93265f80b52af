"""Training data for torchtitan: task generators, local text / JSON-lines, Hugging Face datasets.

Every source yields rows of exactly ``seq_len`` tokens as ``({"input": ids, "doc_starts": starts},
labels)``. ``doc_starts`` marks where a document (a task example, a text document) begins; the
batch collation turns it into ``cu_seqlens`` on the host (:func:`collate_rows`) so neither Mamba-3
nor attention mixes documents, and no label asks a document to predict the next one. Datasets are resumable (torchtitan checkpoints their
``state_dict``) and split across data-parallel ranks.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator

import torch
from torch.distributed.checkpoint.stateful import Stateful
from torch.utils.data import IterableDataset

from hybridlm.errors import HybridLMError
from hybridlm.eval.tasks import LengthCurriculum, make_task
from hybridlm.eval.tasks.batching import IGNORE_INDEX, next_token_targets
from hybridlm.tokenizer import load_tokenizer

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py")
JSON_SUFFIXES = (".jsonl", ".json")


def build_tokenizer(job_config):
    return load_tokenizer(job_config.hybrid.tokenizer)


def _row(ids: list[int], labels: list[int], starts: list[bool]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    return ({"input": torch.tensor(ids, dtype=torch.long), "doc_starts": torch.tensor(starts, dtype=torch.bool)},
            torch.tensor(labels, dtype=torch.long))


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


def _documents_from_path(path: Path) -> Iterator[str]:
    files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES + JSON_SUFFIXES) if path.is_dir() \
        else [path]
    if not files:
        raise HybridLMError(f"{path} holds no {'/'.join(TEXT_SUFFIXES + JSON_SUFFIXES)} files")
    for file in files:
        if file.suffix in JSON_SUFFIXES:
            with file.open(encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        record = json.loads(line)
                        if "text" not in record:
                            raise HybridLMError(f"{file}:{n}: a JSON-lines record needs a 'text' field")
                        yield record["text"]
        else:
            yield file.read_text(encoding="utf-8", errors="replace")


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

    def _documents(self) -> Iterator[str]:
        while True:  # one pass after another
            docs = _documents_from_hub(self.source[3:]) if self.source.startswith("hf:") \
                else _documents_from_path(Path(self.source))
            mine = (d for i, d in enumerate(docs) if i % self.dp_world_size == self.dp_rank)
            count = 0
            for doc in mine:
                count += 1
                yield doc
            if count == 0:
                raise HybridLMError(f"hybrid.data={self.source!r} gave no documents for data-parallel rank "
                                    f"{self.dp_rank} of {self.dp_world_size}")

    def __iter__(self) -> Iterator:
        docs = self._documents()
        for _ in range(self.doc_index):  # resume: skip what earlier runs consumed
            next(docs)
        while True:
            while len(self.buffer) < self.seq_len + 1:
                ids = self.tokenizer.encode(next(docs))
                self.doc_index += 1
                if ids:
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


def build_rows(job_config, tokenizer, *, dp_rank: int = 0, dp_world_size: int = 1):
    h = job_config.hybrid
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

    rows = build_rows(job_config, tokenizer, dp_rank=dp_rank, dp_world_size=dp_world_size)
    kwargs = {**asdict(job_config.training.dataloader), "batch_size": job_config.training.local_batch_size}
    return ParallelAwareDataloader(rows, dp_rank=dp_rank, dp_world_size=dp_world_size, collate_fn=collate_rows,
                                   **kwargs)
