"""lm-eval's ``LM`` interface on the llmcomp runtime (:class:`~llmcomp.runtime.ModelRunner`).

Why: lm-eval's ``HFLM`` runs one full forward of context + continuation per request, so a
multiple-choice task pays for its shared context once per choice, through the HF module graph.
Here requests are grouped by their context tokens; each distinct context is prefilled once into a
KV-cache slot (several contexts side by side in one padded forward), and every continuation of it
is then scored from that slot (rewound to the context length between continuations). A
one-token continuation ("positive"/"negative") needs no forward of its own at all: the context's
last logits predict it.

Tokenization and what is scored are HFLM's: the class derives from lm-eval's ``TemplateLM``,
whose ``loglikelihood`` and ``_encode_pair`` (trailing context spaces moved to the continuation,
whole string encoded and split at the context length, an empty context replaced by the prefix
token) are used unchanged, with HFLM's ``tok_encode``, ``prefix_token_id`` and maximum length.
Log-probabilities are taken with ``log_softmax`` in at least float32 (HFLM: in the model dtype).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import (
    handle_stop_sequences,
    has_bos_prefix,
    normalize_gen_kwargs,
    postprocess_generated_text,
    resolve_max_length,
)
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from llmcomp.eval.harness import DEFAULT_SLOTS
from llmcomp.runtime import ModelRunner, context_length
from llmcomp.runtime.sampling import SamplingParams, make_generator, sample_rows
from llmcomp.runtime.stopping import eos_token_ids

FORWARD_TOKENS = 2048  # padded tokens per forward: bounds the [rows, width, vocab] logits
CACHE_TOKENS = 16384  # slots x length of the KV cache (long rolling windows get fewer slots)
MAX_GEN_TOKS = 256  # HFLM's default generation length
log = logging.getLogger(__name__)

Request = tuple[Any, list[int], list[int]]  # (strings, context tokens, continuation tokens)
Group = tuple[tuple[int, ...], list[tuple[tuple[int, ...], list[int]]]]  # context, [(continuation, request ids)]


def token_scores(logits: torch.Tensor, targets: list[int]) -> tuple[float, bool]:
    """Sum of log-softmax at ``targets`` over the rows of ``logits [n, V]``, and whether every
    target is the row's argmax (HFLM's ``is_greedy``)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    target = torch.tensor(targets, device=logits.device)
    logp = torch.log_softmax(logits, dim=-1).gather(-1, target[:, None])
    return float(logp.sum()), bool((logits.argmax(dim=-1) == target).all())


def _progress(total: int, label: str, enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn("requests"),
                    TimeRemainingColumn(), transient=True, disable=not enabled)


class RuntimeLM(TemplateLM):
    """lm-eval model on a loaded causal LM through the runtime: shared contexts computed once."""

    def __init__(self, model: Any, tokenizer: Any, slots: int = DEFAULT_SLOTS, progress: bool = True) -> None:
        super().__init__()
        if slots < 1:
            raise ValueError(f"slots must be at least 1, got {slots}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.slots = slots
        self.progress = progress
        # HFLM's length, capped where the runtime's position tables end (the same for Llama configs).
        self.max_length = min(resolve_max_length(model.config, tokenizer), context_length(model))
        self.max_gen_toks = MAX_GEN_TOKS
        self.forward_tokens = FORWARD_TOKENS

    # -- HFLM's tokenization ----------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   left_truncate_len: int | None = None, **kwargs: Any) -> list[int]:
        """HFLM's ``tok_encode``: the tokenizer's default special tokens, unless the string
        already starts with the prefix (BOS) token."""
        special = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            special["add_special_tokens"] = False
        ids = self.tokenizer.encode(string, **special)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    # -- lm-eval entry points ---------------------------------------------------------------------
    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not self.progress)

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Per-document log-likelihood over HFLM's disjoint rolling windows of ``max_length``."""
        windows: list[Request] = []
        owners: list[int] = []
        for i, request in enumerate(requests):
            (text,) = request.args
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owners.append(i)
        totals = [0.0] * len(requests)
        for owner, (ll, _) in zip(owners, self._loglikelihood_tokens(windows, label="rolling loglikelihood"),
                                  strict=True):
            totals[owner] += ll
        return totals

    def _loglikelihood_tokens(self, requests: list[Request], disable_tqdm: bool = False,
                              label: str = "loglikelihood", **kwargs: Any) -> list[tuple[float, bool]]:
        """(sum log p(continuation | context), is_greedy) per request, in request order."""
        pairs = [self._fit(ctx, cont) for _, ctx, cont in requests]
        groups = self._groups(pairs)
        results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        if not groups:
            return results
        length = max(len(ctx) + len(cont) - 1 for ctx, cont in pairs)
        runner = self._runner(len(groups), length)
        with _progress(len(requests), label, self.progress and not disable_tqdm) as bar:
            task = bar.add_task(label, total=len(requests))
            for batch in self._batches(groups, runner.max_batch_size):
                for request_ids, score in self._score_groups(runner, batch):
                    for i in request_ids:
                        results[i] = score
                    bar.advance(task, len(request_ids))
        return results

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with ``do_sample``) generation until a stop string, EOS or
        ``max_gen_toks``, prompts batched over the runner's slots (as HFLM's ``generate_until``)."""
        by_kwargs: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            by_kwargs.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(i)
        results = [""] * len(requests)
        with _progress(len(requests), "generate_until", self.progress and not disable_tqdm) as bar:
            task = bar.add_task("generate_until", total=len(requests))
            for ids in by_kwargs.values():
                for i, text in zip(ids, self._generate([requests[i].args[0] for i in ids], requests[ids[0]].args[1]),
                                   strict=True):
                    results[i] = text
                    bar.advance(task)
        return results

    # -- scoring ----------------------------------------------------------------------------------
    def _fit(self, ctx: list[int], cont: list[int]) -> tuple[list[int], list[int]]:
        """HFLM's left truncation: the model sees at most ``max_length`` tokens of context +
        continuation[:-1]; the continuation itself is never cut."""
        if not ctx or not cont:
            raise ValueError("loglikelihood needs a non-empty context and continuation")
        if len(cont) > self.max_length:
            raise ValueError(f"a continuation of {len(cont)} tokens exceeds the maximum length {self.max_length}")
        overflow = len(ctx) + len(cont) - 1 - self.max_length
        if overflow > 0:
            log.warning("context of %d tokens truncated by %d from the left", len(ctx), overflow)
            ctx = ctx[overflow:]
        return ctx, cont

    @staticmethod
    def _groups(pairs: list[tuple[list[int], list[int]]]) -> list[Group]:
        """Requests grouped by context, and within a context by continuation (repeats are
        scored once); longest contexts first, as HFLM orders them."""
        by_context: dict[tuple[int, ...], dict[tuple[int, ...], list[int]]] = {}
        for i, (ctx, cont) in enumerate(pairs):
            by_context.setdefault(tuple(ctx), {}).setdefault(tuple(cont), []).append(i)
        groups = [(ctx, list(conts.items())) for ctx, conts in by_context.items()]
        return sorted(groups, key=lambda g: -len(g[0]))

    def _batches(self, groups: list[Group], slots: int) -> Iterator[list[Group]]:
        """Runs of groups that fill at most ``slots`` slots and ``forward_tokens`` padded tokens."""
        start = 0
        while start < len(groups):
            width = len(groups[start][0])  # the longest context of the run (sorted descending)
            size = max(1, min(slots, self.forward_tokens // width))
            yield groups[start:start + size]
            start += size

    def _runner(self, groups: int, length: int) -> ModelRunner:
        """A runner sized for this call: enough slots for the groups, within the cache budget."""
        slots = max(1, min(self.slots, groups, CACHE_TOKENS // length))
        return ModelRunner(self.model, max_batch_size=slots, max_model_len=length)

    def _score_groups(self, runner: ModelRunner, batch: list[Group]) -> Iterator[tuple[list[int], tuple[float, bool]]]:
        """Prefill the batch's contexts into slots ``0..n-1`` once, then score each continuation
        round (the k-th continuation of every context) from the rewound slots."""
        for slot in range(len(batch)):
            runner.free(slot)
        last = self._prefill(runner, [list(ctx) for ctx, _ in batch])
        for k in range(max(len(conts) for _, conts in batch)):
            live = [s for s, (_, conts) in enumerate(batch) if k < len(conts)]
            for s in live:
                runner.rewind(s, len(batch[s][0]))
            tails = self._append_scored(runner, live, [list(batch[s][1][k][0]) for s in live])
            for s, tail in zip(live, tails, strict=True):
                cont, request_ids = batch[s][1][k]
                ll, greedy = token_scores(last[s][None], [cont[0]])
                yield request_ids, (ll + tail[0], greedy and tail[1])

    def _prefill(self, runner: ModelRunner, contexts: list[list[int]]) -> list[torch.Tensor]:
        """Last-token logits ``[V]`` of each context, appended to slots ``0..n-1``: one padded
        forward for a batch of short contexts, else one chunked prefill per slot."""
        if self._batched(runner, contexts):
            return [logits[-1] for logits in runner.score_batch(list(range(len(contexts))), contexts)]
        return [runner.prefill(slot, ctx) for slot, ctx in enumerate(contexts)]

    def _batched(self, runner: ModelRunner, rows: list[list[int]]) -> bool:
        """Whether ``rows`` go through one padded forward: on the lean forward only (the HF fallback
        runs rows one at a time anyway, and feeds pad tokens to the model at a position past the
        end, out of range for absolute position embeddings), within the token budget."""
        return (runner.backend == "lean" and len(rows) > 1
                and len(rows) * max(map(len, rows)) <= self.forward_tokens)

    def _append_scored(self, runner: ModelRunner, slots: list[int], conts: list[list[int]]) -> list[tuple[float, bool]]:
        """Append ``cont[:-1]`` to each slot and score ``cont[1:]`` from its logits: one padded
        forward over the slot span when it fits, else per slot in chunks (long rolling windows)."""
        rows = [cont[:-1] for cont in conts]
        scores = [(0.0, True)] * len(slots)
        todo = [i for i, row in enumerate(rows) if row]
        if not todo:
            return scores
        lo, hi = slots[todo[0]], slots[todo[-1]]
        span = {slots[i]: i for i in todo}
        batch_rows = [rows[span[s]] if s in span else [] for s in range(lo, hi + 1)]
        if len(todo) > 1 and self._batched(runner, batch_rows):
            for s, logits in zip(range(lo, hi + 1), runner.score_batch(list(range(lo, hi + 1)), batch_rows),
                                 strict=True):
                if s in span:
                    scores[span[s]] = token_scores(logits, conts[span[s]][1:])
            return scores
        chunk = runner.prefill_chunk
        for i in todo:
            ll, greedy = 0.0, True
            for start in range(0, len(rows[i]), chunk):
                logits = runner.prefill(slots[i], rows[i][start:start + chunk], logits_for_all=True)
                part_ll, part_greedy = token_scores(logits, conts[i][1 + start:1 + start + chunk])
                ll, greedy = ll + part_ll, greedy and part_greedy
            scores[i] = (ll, greedy)
        return scores

    # -- generation -------------------------------------------------------------------------------
    def _generate(self, contexts: list[str], gen_kwargs: dict) -> list[str]:
        kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        until = handle_stop_sequences(kwargs.pop("until", None),
                                      eos=self.tokenizer.decode(self.eot_token_id, skip_special_tokens=False))
        max_gen = int(kwargs.pop("max_gen_toks"))
        if max_gen >= self.max_length:
            raise ValueError(f"max_gen_toks {max_gen} must be below the maximum length {self.max_length}")
        temperature = float(kwargs.get("temperature") or 0.0) if kwargs.get("do_sample") else 0.0
        params = SamplingParams(max_tokens=max_gen, temperature=temperature, top_p=float(kwargs.get("top_p") or 1.0),
                                top_k=int(kwargs.get("top_k") or 0))
        encoded = [self.tok_encode(c, left_truncate_len=self.max_length - max_gen) for c in contexts]
        runner = ModelRunner(self.model, max_batch_size=min(self.slots, len(contexts)),
                             max_model_len=max(map(len, encoded)) + max_gen)
        eos = eos_token_ids(self.model, self.tokenizer)
        texts: list[str] = []
        for start in range(0, len(encoded), runner.max_batch_size):
            batch = encoded[start:start + runner.max_batch_size]
            generators = [make_generator(None) for _ in batch]
            for slot in range(len(batch)):
                runner.free(slot)
            logits = torch.stack([runner.prefill(slot, ids) for slot, ids in enumerate(batch)])
            generated: list[list[int]] = [[] for _ in batch]
            done = [False] * len(batch)
            while True:
                for i, token in enumerate(sample_rows(logits, [params] * len(batch), generators)):
                    if not done[i]:
                        generated[i].append(token)
                        done[i] = self._stopped(generated[i], eos, until, max_gen)
                if all(done):
                    break
                logits = runner.decode([g[-1] for g in generated])
            texts += [postprocess_generated_text(self.tokenizer.decode(g, skip_special_tokens=True), until, None)
                      for g in generated]
        return texts

    def _stopped(self, generated: list[int], eos: set[int], until: list[str], max_gen: int) -> bool:
        if len(generated) >= max_gen or generated[-1] in eos:
            return True
        text = self.tokenizer.decode(generated, skip_special_tokens=False)
        return any(stop and stop in text for stop in until)

