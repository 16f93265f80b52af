"""Batched decoding: one prefill of prompts of different lengths, then one token per row per step.

    decoder = Decoder(model, batch_size=3, max_len=512)     # owns the HybridCache of the batch
    logits = decoder.prefill([p0, p1, p2])                  # (3, vocab): each prompt's last logits
    logits = decoder.step(next_tokens)                      # (3,) -> (3, vocab), every row advances
    tokens = decoder.step_greedy(next_tokens)               # (3,) -> (3,): the greedy choice, in the graph
    tokens = decoder.step_greedy()                          # feeds the last step_greedy's tokens back
    logits = decoder.extend([q0, q1, q2])                   # more tokens a row (any lengths), chunked

The prefill packs the prompts (``cu_seqlens``) into one forward that writes each prompt's Mamba-3
state and keys/values into its cache row; with ``prefill_chunk=C`` it runs C tokens of every
prompt at a time instead (the states and KV caches carried from chunk to chunk), so a long prompt
needs the activations of C tokens, not of the whole prompt; with ``prefill_rows=G`` it takes G
sequences at a time (through views of their cache rows). A forward that runs out of memory beside a
large cache is retried smaller: C halved while it is above a scan chunk (64 tokens), then G halved
(below that, each Mamba-3 layer's fp32 states of every row, 2 MiB a row and layer in the 1.5B
presets, are most of a forward's memory: at batch 2,664 no token chunk fit), then C again, down to
one token of one sequence. A step feeds one token per row;
attention reads the preallocated KV cache with per-row lengths, Mamba-3 runs its decode step.
Every state is updated in place on the device and the step has fixed shapes, so on CUDA it is
recorded once in a ``torch.cuda.CUDAGraph`` and replayed: one launch instead of hundreds of small
kernels. The graph ends with the greedy choice (hybridlm/kernels/greedy/) written into its own token
input, so greedy generation (``step_greedy``) copies neither logits out nor tokens in. Prefill and
step run the model's inference path (``features(..., fused_norms=True)``: one fused residual add +
RMSNorm per block boundary); ``compile_step`` runs the step through ``torch.compile`` (inside the
captured graph on CUDA).
"""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Sequence

import torch
from torch import Tensor

from hybridlm.errors import ShapeError
from hybridlm.kernels.greedy import argmax as greedy_argmax

if TYPE_CHECKING:
    from hybridlm.builder.inference.cache import HybridCache
    from hybridlm.builder.model.hybrid_lm import HybridLM

# Eager runs before capture, as torch.cuda.graphs asks: lazy initialisation, cuBLAS workspaces
# and JIT compiles (Triton, CuTe) must happen outside the recording.
WARMUP_STEPS = 3
# Tokens a prefill forward takes at most unless ``prefill_chunk`` says otherwise: the 1.5B presets'
# activations at this many tokens take about 11 GiB (hybrid-1.5b on the H200, 2026-12-03).
PREFILL_TOKENS = 131072
# After running out of memory, the token chunk is halved while above this (the Mamba-3 scan's chunk),
# then the rows: below it the per-row states, not the tokens, fill a forward's memory.
ROWS_BEFORE_TOKENS_BELOW = 64


def chunk_within(batch_size: int, longest: int, budget: int) -> int:
    """Tokens of each prompt per prefill forward so that a forward takes at most ``budget`` tokens:
    the whole prompt when it fits, else a multiple of 64 (the Mamba-3 scan's chunk) when that large."""
    chunk = max(1, min(longest, budget // batch_size))
    return chunk - chunk % 64 if 64 <= chunk < longest else chunk


def _check_cache_fits(model: "HybridLM", batch_size: int, max_len: int, device: torch.device) -> None:
    """Refuse a cache the device cannot hold before allocating it (a billion tokens is terabytes)."""
    from hybridlm.builder.model.accounting import check_memory, decode_state_bytes

    per_sequence = decode_state_bytes(model, max_len, model.tok_embeddings.weight.dtype)
    check_memory(f"a decode cache of {batch_size} x {max_len} tokens", batch_size * per_sequence, device,
                 "lower max_len (prompt + new tokens) or the batch size")


class Decoder:
    """A batch of ``batch_size`` sequences of at most ``max_len`` tokens each (prompt + generated).

    ``cuda_graph``: replay the step from a CUDA graph when the model is on CUDA (ignored on other
    devices); False runs it eagerly, which is what the graph is tested against.
    ``prefill_chunk``: prefill at most this many tokens of each prompt per forward (None: whole
    prompts in one forward while the batch's prompts total at most ``PREFILL_TOKENS`` tokens, else
    :func:`chunk_within` that budget); the result equals the unchunked prefill up to summation order.
    ``prefill_rows``: prefill at most this many sequences per forward (None: all of them), the same
    result; both are lowered by themselves when a prefill runs out of memory (with a warning).
    ``compile_step``: run the step through ``torch.compile`` (True: the default inductor backend;
    a string: that ``torch.compile`` backend); on CUDA the compiled step is what the graph captures.
    ``fused_norms``: the model's fused add + RMSNorm path (False: the blocks' own ops, as in training).
    """

    def __init__(self, model: "HybridLM", batch_size: int, max_len: int, *, cuda_graph: bool = True,
                 prefill_chunk: int | None = None, prefill_rows: int | None = None,
                 compile_step: bool | str = False, fused_norms: bool = True):
        if batch_size < 1 or max_len < 1:
            raise ShapeError(f"Decoder needs batch_size >= 1 and max_len >= 1; got {batch_size} and {max_len}")
        for name, value, what in (("prefill_chunk", prefill_chunk, "tokens"), ("prefill_rows", prefill_rows,
                                                                                "sequences")):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ShapeError(f"Decoder {name} must be a positive number of {what} or None; got {value!r}")
        if not isinstance(compile_step, (bool, str)):
            raise ValueError(f"Decoder compile_step must be True, False or a torch.compile backend name; "
                             f"got {compile_step!r}")
        self.model = model
        self.batch_size = batch_size
        self.max_len = max_len
        self.prefill_chunk = prefill_chunk
        self.prefill_rows = prefill_rows
        self.fused_norms = fused_norms
        self.device = model.tok_embeddings.weight.device
        _check_cache_fits(model, batch_size, max_len, self.device)
        self.cache = model.allocate_cache(batch_size, max_len)
        self.lengths: list[int] = [0] * batch_size  # tokens per row, kept on the host
        self.uses_cuda_graph = cuda_graph and self.device.type == "cuda"
        self._prefilled = False
        # the graph's input, and at its end the greedy choice of its logits (what step_greedy() feeds back)
        self._step_tokens = torch.zeros(batch_size, dtype=torch.long, device=self.device)
        self._greedy_fed = False  # _step_tokens holds the tokens the last step_greedy returned
        self._graph: torch.cuda.CUDAGraph | None = None
        self._graph_logits: Tensor | None = None  # the graph's output
        # A plain function of (model, cache, ...), never a bound method: a Decoder that referenced
        # itself would be freed only by Python's cycle collector, keeping its cache (GBs at large
        # batch) and its graph's memory pool alive after the last reference goes.
        self._step_fn = _step_logits
        if compile_step:
            backend = "inductor" if compile_step is True else compile_step
            self._step_fn = torch.compile(_step_logits, backend=backend)
        if self.uses_cuda_graph:
            self._capture_step()

    # -- public -------------------------------------------------------------------------------------
    def reset(self) -> "Decoder":
        """Forget every sequence (in place: a captured graph stays valid)."""
        self.cache.reset()
        self.lengths = [0] * self.batch_size
        self._prefilled = False
        self._greedy_fed = False
        return self

    @torch.no_grad()
    def prefill(self, prompts: Tensor | Sequence[Tensor]) -> Tensor:
        """Start ``batch_size`` new sequences; returns each one's last-token logits (B, vocab).

        ``prompts``: a list of 1-D token tensors (lengths may differ; packed into one forward) or
        a (B, L) tensor.
        """
        ids, cu_seqlens, lengths = self._pack(prompts)
        if max(lengths) > self.max_len:
            raise ShapeError(f"a prompt of {max(lengths)} tokens does not fit the Decoder's max_len "
                             f"{self.max_len}; create the Decoder with max_len >= prompt length + new tokens")
        while True:
            self.reset()
            try:
                last = self._prefill_last_hidden(ids, cu_seqlens, lengths)
                break
            except torch.OutOfMemoryError:
                rows = self._rows_per_forward()
                chunk = self._chunk_for(lengths[:rows])
                if chunk <= 1 and rows <= 1:
                    raise
            # out of the except block: the error's frames, and the activations they hold, are gone
            self._shrink_prefill(rows, chunk)
        self.lengths = lengths
        self._prefilled = True
        return self.model.output(last)

    @torch.no_grad()
    def extend(self, prompts: Tensor | Sequence[Tensor]) -> Tensor:
        """Append more tokens to every sequence, as a prefill that continues the cache (a follow-up turn,
        or a cache filled to a given context); returns each row's last-token logits (B, vocab).

        ``prompts``: a (B, L) tensor (L more tokens a row) or a list of B non-empty 1-D tensors (any
        lengths, packed into one forward), whatever each row holds already. It runs in the prefill's
        chunks and row groups (``prefill_chunk``, ``prefill_rows``: an earlier prefill may have lowered
        them); unlike :meth:`prefill` it cannot retry smaller after running out of memory, as the cache
        already holds part of the tokens: the error then names the settings to lower."""
        if not self._prefilled:
            raise ShapeError("Decoder.extend before prefill: call decoder.prefill(prompts) first")
        ids, cu_seqlens, added = self._pack(prompts)
        held = self.lengths
        over = [i for i, (n, a) in enumerate(zip(held, added)) if n + a > self.max_len]
        if over:
            i = over[0]
            raise ShapeError(f"the Decoder's cache holds {self.max_len} tokens per sequence; row {i} holds {held[i]} "
                             f"and {added[i]} more do not fit: create the Decoder with a larger max_len")
        if max(held) + max(added) > self.max_len:  # the layers' capacity check, a host-side bound, counts this
            raise ShapeError(f"the Decoder's cache holds {self.max_len} tokens per sequence; the layers check room "
                             f"for the longest row ({max(held)}) plus the longest addition ({max(added)}): create "
                             f"the Decoder with max_len >= {max(held) + max(added)}")
        try:
            last = self._prefill_last_hidden(ids, cu_seqlens, added, held)
        except torch.OutOfMemoryError as e:
            raise torch.OutOfMemoryError(
                f"Decoder.extend ran out of memory with prefill_chunk={self.prefill_chunk} and prefill_rows="
                f"{self.prefill_rows}; the cache is now partly written: prefill again, with smaller values") from e
        self.lengths = [n + a for n, a in zip(held, added)]
        self._greedy_fed = False
        return self.model.output(last)

    @torch.no_grad()
    def step(self, tokens: Tensor) -> Tensor:
        """Feed one token per row (B,); returns the next logits (B, vocab), a fresh tensor."""
        longest = self._check_step(tokens)
        if self._graph is not None:
            self._step_tokens.copy_(tokens)
            self._graph.replay()
            logits = self._graph_logits.clone()  # the next replay overwrites the graph's output
        else:
            logits = self._step_logits(tokens.to(self.device))
        self._advance(longest)
        self._greedy_fed = False
        return logits

    @property
    def greedy_fed(self) -> bool:
        """Whether ``step_greedy()`` may feed back the tokens the last step_greedy returned (no prefill,
        extend or step since)."""
        return self._greedy_fed

    @torch.no_grad()
    def step_greedy(self, tokens: Tensor | None = None) -> Tensor:
        """Feed one token per row (B,) and return the greedy next tokens (B,) int64, a fresh tensor: the
        tokens of ``argmax(step(tokens), -1)``, chosen inside the step's CUDA graph (no logits copied out,
        no launches after the replay but the returned copy). ``tokens`` None feeds back the tokens the
        last ``step_greedy`` returned, already on the device (no copy in either)."""
        if tokens is None and not self._greedy_fed:
            raise ShapeError("Decoder.step_greedy() feeds back the last step_greedy's tokens; after a prefill, "
                             "extend or step, pass the tokens to feed (e.g. the greedy choice of its logits)")
        longest = self._check_step(tokens)
        if self._graph is not None:
            if tokens is not None:
                self._step_tokens.copy_(tokens)
            self._graph.replay()  # the graph's last kernel writes the choice into _step_tokens
        else:
            fed = self._step_tokens if tokens is None else tokens.to(self.device)
            greedy_argmax(self._step_logits(fed), out=self._step_tokens)
        self._advance(longest)
        self._greedy_fed = True
        return self._step_tokens.clone()  # the next step overwrites it

    # -- internals ----------------------------------------------------------------------------------
    def _check_step(self, tokens: Tensor | None) -> int:
        """Refuse a step before a prefill, of the wrong shape, or past max_len; the longest row's length."""
        if not self._prefilled:
            raise ShapeError("Decoder.step before prefill: call decoder.prefill(prompts) first")
        if tokens is not None and tokens.shape != (self.batch_size,):
            raise ShapeError(f"step takes one token per row, shape ({self.batch_size},); got {tuple(tokens.shape)}")
        longest = max(self.lengths)
        if longest + 1 > self.max_len:
            raise ShapeError(f"the Decoder's cache holds {self.max_len} tokens per sequence and a sequence "
                             f"already has {longest}; create the Decoder with a larger max_len "
                             f"(longest prompt + max new tokens)")
        return longest

    def _advance(self, longest: int) -> None:
        self.lengths = [n + 1 for n in self.lengths]
        self.cache.set_host_length(longest + 1)  # a replay ran no Python: keep the host bounds here

    def _features(self, ids: Tensor, cu_seqlens: Tensor | None, cache: "HybridCache") -> Tensor:
        return self.model.features(ids, cu_seqlens=cu_seqlens, cache=cache, fused_norms=self.fused_norms)

    def _step_logits(self, tokens: Tensor) -> Tensor:
        return self._step_fn(self.model, self.cache, tokens, self.fused_norms)

    def _chunk_for(self, lengths: list[int]) -> int:
        """Tokens of each prompt a prefill forward of these prompts takes (``prefill_chunk``, or the token
        budget's)."""
        return self.prefill_chunk or (max(lengths) if sum(lengths) <= PREFILL_TOKENS
                                      else chunk_within(len(lengths), max(lengths), PREFILL_TOKENS))

    def _rows_per_forward(self) -> int:
        return min(self.prefill_rows or self.batch_size, self.batch_size)

    def _shrink_prefill(self, rows: int, chunk: int) -> None:
        """After a prefill forward of ``rows`` sequences and ``chunk`` tokens a row ran out of memory: half
        the tokens while above a scan chunk, then half the rows, then the tokens again (a large cache
        leaves less room than the token budget assumes, e.g. the 1.5B state models at batch 2,664 on an
        H200); the results change only in summation order."""
        if chunk > 1 and (chunk > ROWS_BEFORE_TOKENS_BELOW or rows <= 1):
            self.prefill_chunk = max(1, chunk // 2)
            change = f"prefilling {self.prefill_chunk} tokens a row at a time (set prefill_chunk to choose)"
        else:
            self.prefill_rows = max(1, rows // 2)
            change = f"prefilling {self.prefill_rows} sequences at a time (set prefill_rows to choose)"
        warnings.warn(f"Decoder prefill: a forward of {rows} sequences x {chunk} tokens ran out of memory beside "
                      f"the cache; {change}", RuntimeWarning, stacklevel=3)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _prefill_last_hidden(self, ids: Tensor, cu_seqlens: Tensor | None, lengths: list[int],
                             held: list[int] | None = None) -> Tensor:
        """Run the prompts into the cache after the tokens each row ``held`` (None: the cache is empty),
        ``prefill_rows`` sequences at a time (each group through views of its cache rows); every prompt's
        last hidden state (B, d_model)."""
        held = held or [0] * self.batch_size
        rows = self._rows_per_forward()
        if rows >= self.batch_size:
            last = self._prefill_group(self.cache, ids, cu_seqlens, lengths)
        else:
            parts = []
            for start in range(0, self.batch_size, rows):
                stop = min(start + rows, self.batch_size)
                if cu_seqlens is None:
                    group_ids, group_cu = ids[start:stop], None
                else:  # the group's prompts are contiguous in the packed ids
                    first, end = int(cu_seqlens[start]), int(cu_seqlens[stop])
                    group_ids, group_cu = ids[:, first:end], cu_seqlens[start:stop + 1] - first
                group = self.cache.rows(start, stop)
                group.set_host_length(max(held[start:stop]))  # a view's host bound starts at 0
                parts.append(self._prefill_group(group, group_ids, group_cu, lengths[start:stop]))
            last = torch.cat(parts)
        # the groups counted their tokens in their own views, a packed forward its longest prompt's
        self.cache.set_host_length(max(n + a for n, a in zip(held, lengths)))
        return last

    def _prefill_group(self, cache: "HybridCache", ids: Tensor, cu_seqlens: Tensor | None,
                       lengths: list[int]) -> Tensor:
        """Run prompts into their (empty) cache rows; each one's last hidden state (len(lengths), d_model).

        Chunk c holds tokens [c·C, (c+1)·C) of every prompt (C = :meth:`_chunk_for`): a dense
        (B, L) chunk, or a packed one where a prompt already finished has no token (an empty
        sequence: its state and keys pass through)."""
        chunk = self._chunk_for(lengths)
        if cu_seqlens is None:
            for start in range(0, ids.shape[1], chunk):
                hidden = self._features(ids[:, start: start + chunk], None, cache)
            return hidden[:, -1]
        if chunk >= max(lengths):
            hidden = self._features(ids, cu_seqlens, cache)
            return hidden[0, cu_seqlens[1:].long() - 1]
        offsets = [0]
        for n in lengths:
            offsets.append(offsets[-1] + n)
        last = None
        for start in range(0, max(lengths), chunk):
            taken = [min(max(n - start, 0), chunk) for n in lengths]
            pieces = [ids[0, offsets[i] + start: offsets[i] + start + t] for i, t in enumerate(taken) if t]
            ends = [0]
            for t in taken:
                ends.append(ends[-1] + t)
            hidden = self._features(torch.cat(pieces)[None],
                                    torch.tensor(ends, dtype=torch.int32, device=self.device), cache)
            if last is None:
                last = hidden.new_empty(len(lengths), hidden.shape[-1])
            done = [i for i, n in enumerate(lengths) if start < n <= start + chunk]  # rows ending in this chunk
            if done:
                rows = torch.tensor(done, device=self.device)
                last[rows] = hidden[0, torch.tensor([ends[i + 1] - 1 for i in done], device=self.device)]
        return last

    @torch.no_grad()
    def _capture_step(self) -> None:
        """Record the step (``_step_logits``, compiled or not) on the static token buffer into a CUDA graph.

        Warm-up and capture run on the empty cache, so resetting it afterwards undoes what they wrote.
        """
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):  # the first one compiles, with compile_step
                self.cache.reset()  # each warm-up step starts empty: max_len = 1 must work too
                greedy_argmax(self._step_logits(self._step_tokens), out=self._step_tokens)
        current.wait_stream(side)
        self.cache.reset()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._graph_logits = self._step_logits(self._step_tokens)
            # written after the embedding read this token: step() copies its tokens in before each replay
            greedy_argmax(self._graph_logits, out=self._step_tokens)
        self._graph = graph
        self.reset()

    def _pack(self, prompts: Tensor | Sequence[Tensor]) -> tuple[Tensor, Tensor | None, list[int]]:
        """prompts -> (ids (B, L) or packed (1, T), cu_seqlens or None, host lengths)."""
        if isinstance(prompts, Tensor):
            if prompts.dim() != 2 or prompts.shape[1] == 0:
                raise ShapeError(f"prompts must be a (batch, seq) tensor with seq >= 1 or a list of 1-D tensors; "
                                 f"got shape {tuple(prompts.shape)}")
            if prompts.shape[0] != self.batch_size:
                raise ShapeError(f"the Decoder was created for {self.batch_size} sequences; got {prompts.shape[0]}")
            return prompts.to(self.device), None, [prompts.shape[1]] * self.batch_size
        prompts = list(prompts)
        if len(prompts) != self.batch_size:
            raise ShapeError(f"the Decoder was created for {self.batch_size} sequences; got {len(prompts)} prompts")
        for i, p in enumerate(prompts):
            if not isinstance(p, Tensor) or p.dim() != 1 or p.numel() == 0:
                shape = tuple(p.shape) if isinstance(p, Tensor) else type(p).__name__
                raise ShapeError(f"prompt {i} must be a non-empty 1-D tensor of token ids; got {shape}")
        lengths = [p.numel() for p in prompts]
        ids = torch.cat([p.to(self.device) for p in prompts])[None]
        offsets = [0]
        for n in lengths:
            offsets.append(offsets[-1] + n)
        cu_seqlens = torch.tensor(offsets, dtype=torch.int32, device=self.device)
        return ids, cu_seqlens, lengths


def _step_logits(model: "HybridLM", cache, tokens: Tensor, fused_norms: bool) -> Tensor:
    """The whole decode step on the device: fixed shapes, in-place state updates, no host sync."""
    return model.output(model.features(tokens[:, None], cache=cache, fused_norms=fused_norms)[:, 0])
