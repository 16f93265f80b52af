"""lm-evaluation-harness adapter: run lm-eval tasks (the paper's zero-shot suite) on a hybridlm model.

Importing this module registers the model class under the name ``hybridlm`` in lm-eval's model
registry. lm-eval 0.4.13 discovers no models outside its own package, so its plain ``lm_eval``
command cannot see this one; this module's command line is lm-eval's, with the registration done:

    python -m hybridlm.eval.lm_eval_model --model hybridlm --model_args pretrained=DIR \\
        --tasks lambada_openai,hellaswag,piqa,arc_easy,arc_challenge,winogrande,openbookqa

model_args: ``pretrained=DIR`` (a model folder) or ``spec=PATH_OR_PRESET`` (random weights, for
smoke runs; ``seed``), ``tokenizer`` (override), ``device``, ``dtype``, ``batch_size`` (an int or
``auto``: start at ``max_batch_size`` and halve on CUDA out-of-memory), ``max_length`` (default: the
folder's training length, else 2048), ``prefix_token_id`` (the token an empty context is replaced by).

From Python, :func:`evaluate_lm_eval` wraps ``lm_eval.simple_evaluate``.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable

try:
    # lm-eval's own model names first: its get_model fills the registry only while it is empty,
    # so registering ours into an empty registry would hide `hf` and the others
    import lm_eval.models  # noqa: F401
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as _e:  # one message that names the fix, instead of a deep traceback
    raise ImportError("hybridlm.eval.lm_eval_model needs lm-evaluation-harness 0.4.13: "
                      "pip install 'hybridlm[lm-eval]'") from _e

import torch
from tqdm import tqdm

from hybridlm.builder.model.build import build_model
from hybridlm.builder.inference.generate import sample_next
from hybridlm.builder.model.hybrid_lm import HybridLM
from hybridlm.builder.io.pretrained import Pretrained, load_pretrained
from hybridlm.errors import HybridLMError
from hybridlm.tokenizer import check_vocab, load_tokenizer

log = logging.getLogger(__name__)

MODEL_NAME = "hybridlm"
DEFAULT_MAX_LENGTH = 2048
DEFAULT_MAX_GEN_TOKS = 256
DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_BATCH_SIZE = 64
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
# generation keys we act on; others (top_p, ...) are reported once and ignored
_GEN_KEYS = {"until", "max_gen_toks", "do_sample", "temperature", "top_k"}


def _parse_dtype(dtype: Any) -> torch.dtype | None:
    if dtype is None or dtype == "auto" or isinstance(dtype, torch.dtype):
        return None if dtype == "auto" else dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise HybridLMError(f"dtype={dtype!r} is not one of auto, {', '.join(_DTYPES)}") from None


def _parse_device(device: Any) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    # lm-eval's command line passes device=cuda:0 unless told otherwise
    if device.type == "cuda" and not torch.cuda.is_available():
        log.warning("device=%s asked for but CUDA is not available; running on cpu", device)
        return torch.device("cpu")
    return device


def _load_spec_or_preset(ref: Any):
    from hybridlm.layouts.io import load_spec
    from hybridlm.layouts.presets import get_preset, preset_names

    if not isinstance(ref, (str, Path)):
        return ref  # a ModelSpec
    if Path(ref).is_file():
        return load_spec(ref)
    try:
        return get_preset(str(ref))
    except KeyError:
        raise HybridLMError(f"spec={ref!r} is neither a spec file nor a preset; presets: "
                            f"{', '.join(preset_names())}") from None


class HybridLMEval(LM):
    """A hybridlm model as an lm-eval ``LM``: loglikelihood, loglikelihood_rolling, generate_until.

    ``pretrained`` is a model folder (path), a loaded :class:`Pretrained`, or a :class:`HybridLM`
    (then ``tokenizer`` defaults to the byte tokenizer); ``spec`` builds random weights instead.
    """

    def __init__(self, pretrained: "str | Path | Pretrained | HybridLM | None" = None, spec: Any = None, *,
                 tokenizer: Any = None, seed: int = 0, device: Any = None, dtype: Any = None,
                 batch_size: "int | str" = DEFAULT_BATCH_SIZE, max_batch_size: int | None = None,
                 max_length: int | None = None, prefix_token_id: int | None = None, **unknown: Any):
        super().__init__()
        if unknown:
            raise TypeError(f"unknown model_args for {MODEL_NAME}: {', '.join(sorted(unknown))}; accepted: "
                            "pretrained, spec, tokenizer, seed, device, dtype, batch_size, max_batch_size, max_length, "
                            "prefix_token_id")
        if (pretrained is None) == (spec is None):
            raise HybridLMError(f"{MODEL_NAME} needs exactly one of pretrained=DIR (a model folder) or "
                                "spec=PATH_OR_PRESET (random weights)")
        parsed_dtype = _parse_dtype(dtype)
        train_seq_len = None
        if isinstance(pretrained, HybridLM):  # an in-memory model stays where it is unless told otherwise
            self._device = _parse_device(device) if device is not None else next(pretrained.parameters()).device
            model, tok = pretrained.to(device=self._device, dtype=parsed_dtype), load_tokenizer(tokenizer)
        elif spec is not None:
            self._device = _parse_device(device)
            model = build_model(_load_spec_or_preset(spec), device=self._device, dtype=parsed_dtype, seed=seed)
            tok = load_tokenizer(tokenizer)
        else:
            self._device = _parse_device(device)
            if isinstance(pretrained, Pretrained):
                loaded = pretrained
                loaded.model.to(device=self._device, dtype=parsed_dtype)
            else:
                loaded = load_pretrained(pretrained, device=self._device, dtype=parsed_dtype)
            model, train_seq_len = loaded.model, loaded.train_seq_len
            tok = load_tokenizer(tokenizer) if tokenizer is not None else loaded.tokenizer
        check_vocab(tok, model.spec.vocab_size)
        self.model = model.eval()
        self.tokenizer = tok
        self.seed = int(seed)
        self.max_length = int(max_length or train_seq_len or DEFAULT_MAX_LENGTH)
        self.auto_batch = isinstance(batch_size, str) and batch_size.startswith("auto")
        self.batch_size = int(max_batch_size or DEFAULT_MAX_BATCH_SIZE) if self.auto_batch else int(batch_size)
        if self.batch_size < 1 or self.max_length < 2:
            raise HybridLMError(f"batch_size ({self.batch_size}) must be >= 1 and max_length ({self.max_length}) >= 2")
        self.prefix_token_id = int(prefix_token_id) if prefix_token_id is not None else self._default_prefix()
        self._warned_gen_keys: set[str] = set()

    # -- what lm-eval reads besides the three request types ------------------------------------------
    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name", type(self.tokenizer).__name__)

    def get_model_info(self) -> dict:
        return {"hybridlm_spec": self.model.spec.name, "max_length": self.max_length,
                "n_parameters": sum(p.numel() for p in self.model.parameters()),
                "tokenizer": self.tokenizer_name, "prefix_token_id": self.prefix_token_id}

    def _default_prefix(self) -> int:
        """The token that stands in for an empty context: the tokenizer's EOS, else a newline
        (the byte tokenizer has no special tokens; a newline is what separates documents in text)."""
        if self.tokenizer.eos_id is not None:
            return int(self.tokenizer.eos_id)
        newline = self.tokenizer.encode("\n")
        return newline[0] if len(newline) == 1 else 0

    def tok_encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    def tok_decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(list(ids))

    # -- loglikelihood -------------------------------------------------------------------------------
    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context and continuation tokenized separately, so the scored tokens are exactly the
        continuation's own tokens (the same for every choice of a question). As in lm-eval,
        trailing spaces of the context move to the continuation (" Paris", not "Paris")."""
        if context == "":
            cont = self.tok_encode(continuation)
            # lm-eval's rule: condition on the prefix token, unless the continuation starts with it
            if cont and cont[0] == self.prefix_token_id:
                return cont[:1], cont[1:]
            return [self.prefix_token_id], cont
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        if context == "":  # the context was only spaces
            return [self.prefix_token_id], self.tok_encode(continuation)
        return self.tok_encode(context), self.tok_encode(continuation)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [req.args for req in requests]
        results = self.score_tokens([self._encode_pair(c, x) for c, x in pairs], disable_tqdm=disable_tqdm)
        for (context, continuation), result in zip(pairs, results):
            self.cache_hook.add_partial("loglikelihood", (context, continuation), result)
        return results

    @torch.inference_mode()
    def score_tokens(self, pairs: list[tuple[list[int], list[int]]],
                     disable_tqdm: bool = True) -> list[tuple[float, bool]]:
        """(context tokens, continuation tokens) -> (sum of the continuation's log-probabilities,
        whether greedy decoding would produce it), batched.

        The model sees the last ``max_length`` tokens of context + continuation (minus the final
        token, which is only predicted). Rows are right-padded: the model is causal, so padding
        after a row's tokens does not change the logits at its positions.
        """
        inputs, conts = [], []
        for ctx, cont in pairs:
            if not ctx:
                raise HybridLMError("score_tokens needs at least one context token (use the prefix token)")
            if len(cont) > self.max_length:
                raise HybridLMError(f"a continuation of {len(cont)} tokens does not fit max_length={self.max_length}; "
                                    "raise max_length")
            inputs.append((ctx + cont)[-(self.max_length + 1):][:-1])
            conts.append(cont)
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        for i, cont in enumerate(conts):
            if not cont:
                results[i] = (0.0, True)
        # longest first: an out-of-memory shows in the first batch; neighbours have similar lengths
        order = sorted((i for i in range(len(pairs)) if conts[i]), key=lambda i: (-len(inputs[i]), inputs[i]))

        def run(batch: list[int]) -> None:
            width = max(len(inputs[i]) for i in batch)
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            rows, cols, targets = [], [], []
            for r, i in enumerate(batch):
                n, c = len(inputs[i]), len(conts[i])
                ids[r, :n] = torch.tensor(inputs[i])
                rows += [r] * c
                cols += range(n - c, n)
                targets += conts[i]
            hidden = self.model.features(ids.to(self._device))
            # logits only where the continuation is predicted: saves the (B, L, vocab) tensor
            logits = self.model.output(hidden[torch.tensor(rows), torch.tensor(cols)]).float()
            targets_t = torch.tensor(targets, device=logits.device)
            token_logp = logits.log_softmax(-1).gather(1, targets_t[:, None]).squeeze(1).double()
            greedy = logits.argmax(-1) == targets_t
            sizes = [len(conts[i]) for i in batch]
            for i, lp, g in zip(batch, token_logp.split(sizes), greedy.split(sizes)):
                results[i] = (float(lp.sum()), bool(g.all()))

        self._run_batches(order, run, disable_tqdm, "loglikelihood")
        return results  # type: ignore[return-value]

    def _run_batches(self, order: list[int], run: Callable[[list[int]], None], disable_tqdm: bool, desc: str) -> None:
        """Call ``run`` on consecutive batches of ``order``; with batch_size=auto, halve the batch
        size on CUDA out-of-memory and retry."""
        start, bar = 0, tqdm(total=len(order), desc=desc, disable=disable_tqdm)
        while start < len(order):
            batch = order[start:start + self.batch_size]
            try:
                run(batch)
            except torch.cuda.OutOfMemoryError:
                if not self.auto_batch or self.batch_size == 1:
                    raise
                oom = True
            else:
                oom = False
            if oom:  # outside the except block, so the failed batch's tensors are freed
                self.batch_size //= 2
                torch.cuda.empty_cache()
                log.warning("out of GPU memory; batch_size is now %d", self.batch_size)
                continue
            start += len(batch)
            bar.update(len(batch))
        bar.close()

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's full log-likelihood, in disjoint windows of ``max_length`` predicted tokens:
        the first window is conditioned on the prefix token, each later one on the token before it,
        the last (shorter) one on as many earlier tokens as fit (lm-eval's rolling windows with
        context_len=1, as its Hugging Face model uses)."""
        texts = [req.args[0] for req in requests]
        windows, owner = [], []
        for k, text in enumerate(texts):
            for window in get_rolling_token_windows(self.tok_encode(text), self.prefix_token_id,
                                                    self.max_length, context_len=1):
                windows.append(make_disjoint_window(window))
                owner.append(k)
        totals = [0.0] * len(texts)
        for k, (logp, _) in zip(owner, self.score_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[k] += logp
        for text, total in zip(texts, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return totals

    # -- generation ----------------------------------------------------------------------------------
    def _gen_settings(self, gen_kwargs: dict) -> dict:
        for key in set(gen_kwargs) - _GEN_KEYS - self._warned_gen_keys:
            log.warning("generation argument %r is not supported by %s and is ignored", key, MODEL_NAME)
            self._warned_gen_keys.add(key)
        kw = normalize_gen_kwargs(dict(gen_kwargs), default_max_gen_toks=DEFAULT_MAX_GEN_TOKS)
        temperature = float(kw.get("temperature", 0.0))
        if kw.get("do_sample") and "temperature" not in gen_kwargs:
            temperature = 1.0  # do_sample without a temperature samples from the model as is
        eos = self.tok_decode([self.tokenizer.eos_id]) if self.tokenizer.eos_id is not None else None
        top_k = kw.get("top_k")
        return {"until": handle_stop_sequences(kw["until"], eos), "max_gen_toks": int(kw["max_gen_toks"]),
                "temperature": temperature if kw.get("do_sample") else 0.0,
                "top_k": int(top_k) if top_k is not None else None}

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with do_sample/temperature) continuations, cut at the first stop string.

        Recurrent layers cannot skip left padding, so a batch holds prompts of equal token length
        (and equal generation settings); the context keeps its last max_length - max_gen_toks tokens.
        """
        items = []
        for req in requests:
            context, gen_kwargs = req.args
            settings = self._gen_settings(gen_kwargs or {})
            ids = self.tok_encode(context) or [self.prefix_token_id]
            ids = ids[-max(1, self.max_length - settings["max_gen_toks"]):]
            items.append((ids, settings))
        groups: dict[tuple, list[int]] = {}
        for i, (ids, settings) in enumerate(items):
            groups.setdefault((len(ids), json.dumps(settings, sort_keys=True)), []).append(i)
        outputs: list[str | None] = [None] * len(items)
        generator = torch.Generator(device=self._device).manual_seed(self.seed)
        bar = tqdm(total=len(items), desc="generate_until", disable=disable_tqdm)
        for key in sorted(groups, key=lambda k: -k[0]):
            members = groups[key]
            for start in range(0, len(members), self.batch_size):
                batch = members[start:start + self.batch_size]
                texts = self._generate([items[i][0] for i in batch], items[batch[0]][1], generator)
                for i, text in zip(batch, texts):
                    outputs[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(batch))
        bar.close()
        return outputs  # type: ignore[return-value]

    @torch.inference_mode()
    def _generate(self, prompts: list[list[int]], settings: dict, generator: torch.Generator) -> list[str]:
        """Prompts of equal length -> generated texts cut at the first stop string. Decodes with
        the model's cache, one token per step, as ``HybridLM.generate`` does, and stops as soon as
        every row has produced a stop string or EOS."""
        until, max_new = settings["until"], settings["max_gen_toks"]
        ids = torch.tensor(prompts, dtype=torch.long, device=self._device)
        generated: list[list[int]] = [[] for _ in prompts]
        done = [max_new <= 0] * len(prompts)
        if max_new > 0:
            cache = self.model.allocate_cache(len(prompts), ids.shape[1] + max_new)
            logits = self.model.output(self.model.features(ids, cache=cache)[:, -1])
            for step in range(max_new):
                tokens = sample_next(logits, settings["temperature"], settings["top_k"], generator)
                for r, token in enumerate(tokens.tolist()):
                    if done[r]:
                        continue
                    if token == self.tokenizer.eos_id:
                        done[r] = True
                        continue
                    generated[r].append(token)
                    text = self.tok_decode(generated[r])
                    done[r] = any(s and s in text for s in until)
                if all(done) or step + 1 == max_new:
                    break
                logits = self.model.output(self.model.features(tokens[:, None], cache=cache)[:, -1])
        texts = []
        for tokens in generated:
            text = self.tok_decode(tokens)
            for stop in until:
                if stop:
                    text = text.split(stop)[0]
            texts.append(text)
        return texts


# `python -m` runs this file a second time as __main__; only the importable copy registers, or
# lm-eval would see two classes under one name and refuse the second.
if __name__ != "__main__":
    register_model(MODEL_NAME)(HybridLMEval)


def evaluate_lm_eval(model_or_folder: Any, tasks: "str | list[str]", *, tokenizer: Any = None,
                     device: Any = None, dtype: Any = None, batch_size: "int | str" = DEFAULT_BATCH_SIZE,
                     max_length: int | None = None, include_path: "str | Path | list | None" = None,
                     **simple_evaluate_kwargs: Any) -> dict:
    """Run lm-eval tasks on a model folder, a :class:`Pretrained`, a :class:`HybridLM` or a
    :class:`HybridLMEval`; returns ``lm_eval.simple_evaluate``'s results dict.

    ``tasks`` are lm-eval task names or YAML files (a comma-separated string or a list);
    ``include_path`` adds folders of task YAML files; other keywords (``num_fewshot``, ``limit``,
    ``log_samples``, ...) go to ``simple_evaluate``.
    """
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    if isinstance(model_or_folder, HybridLMEval):
        lm = model_or_folder
    else:
        lm = HybridLMEval(model_or_folder, tokenizer=tokenizer, device=device, dtype=dtype,
                          batch_size=batch_size, max_length=max_length)
    if include_path is not None and "task_manager" not in simple_evaluate_kwargs:
        simple_evaluate_kwargs["task_manager"] = TaskManager(include_path=include_path)
    task_list = [t for t in tasks.split(",") if t] if isinstance(tasks, str) else list(tasks)
    return simple_evaluate(model=lm, tasks=task_list, **simple_evaluate_kwargs)


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line (``lm_eval ...`` arguments) with the ``hybridlm`` model registered."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    from hybridlm.eval.lm_eval_model import main as _main  # the importable copy, which registers

    _main()
