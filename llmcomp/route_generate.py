"""Routed greedy generation with the runtime (E-LANG per token), three ways the super model helps:

* :func:`generate_with_deferral` (in the spirit of Big Little Decoder's fallback): the swift
  model proposes every token; when its energy at a step is above ``tau`` the super model produces
  that token instead, and the swift model goes on from it.
* :func:`generate_with_takeover` (what ``llmcomp serve`` does in ``mode: token``): at the first
  step whose energy is above ``tau`` the super model produces that token and all the rest.
* :func:`generate_with_verification` (a speculative window): at a spike the super model checks
  the last ``window`` swift tokens in the same forward that produces the spiked token; the
  longest prefix where its argmax agrees is kept, the first disagreeing token is replaced by the
  super token and the swift tokens after it are dropped.

KV caches: the swift runner's cache always holds the whole sequence (its own tokens and the super
model's, fed back as its next input). The super runner's cache holds a *prefix* of the same
sequence: at a deferral it is caught up by prefilling every token it has not seen yet (one chunked
forward, not one decode per token), then its next-token logits pick the token. With verification
a rejection rolls both caches back to the accepted length (:meth:`ModelRunner.rewind` sets the
slot's length; the stale positions are overwritten by the next tokens), so each cache is again a
prefix of the one token sequence. Greedy decoding only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from llmcomp.routing import Router
from llmcomp.runtime import ModelRunner

SLOT = 0


@dataclass
class DeferredGeneration:
    """Generated tokens, which model produced each, and the super catch-up cost."""

    tokens: list[int] = field(default_factory=list)
    by_super: list[bool] = field(default_factory=list)
    energies: list[float] = field(default_factory=list)
    super_prefill_tokens: int = 0  # tokens the super model prefilled to catch up (its whole cost)
    super_forwards: int = 0  # super model forwards (a catch-up prefill or a decode step each)
    rejected: int = 0  # verification: swift tokens the super model rejected (dropped, not in ``tokens``)

    @property
    def super_fraction(self) -> float:
        return sum(self.by_super) / len(self.by_super) if self.by_super else 0.0


@torch.inference_mode()
def generate_with_deferral(swift: ModelRunner, super_: ModelRunner, prompt: list[int], router: Router,
                           max_tokens: int, eos: set[int] | frozenset[int] = frozenset()) -> DeferredGeneration:
    """Greedy generation of up to ``max_tokens`` tokens after ``prompt`` with per-token deferral."""
    if not prompt:
        raise ValueError("generation needs a non-empty prompt")
    swift.free(SLOT)
    super_.free(SLOT)
    sequence = list(prompt)
    out = DeferredGeneration()
    logits = swift.prefill(SLOT, sequence)
    while len(out.tokens) < max_tokens:
        decision = router.decide(logits)
        if decision.deferred:
            missing = sequence[super_.lengths[SLOT]:]
            out.super_prefill_tokens += len(missing)
            out.super_forwards += 1
            token = int(super_.prefill(SLOT, missing).argmax())
        else:
            token = int(logits.argmax())
        sequence.append(token)
        out.tokens.append(token)
        out.by_super.append(decision.deferred)
        out.energies.append(decision.energy)
        if token in eos or len(out.tokens) >= max_tokens:
            break
        logits = swift.decode([token])[0]
    return out


@torch.inference_mode()
def generate_with_takeover(swift: ModelRunner, super_: ModelRunner, prompt: list[int], router: Router,
                           max_tokens: int, eos: set[int] | frozenset[int] = frozenset(),
                           first_only: bool = False) -> DeferredGeneration:
    """Greedy generation where the super model takes over for good at the first spike (the super
    cache caught up once); ``first_only`` decides only after the prefill (per-request routing)."""
    if not prompt:
        raise ValueError("generation needs a non-empty prompt")
    swift.free(SLOT)
    super_.free(SLOT)
    out = DeferredGeneration()
    logits = swift.prefill(SLOT, list(prompt))
    on_super = False
    while len(out.tokens) < max_tokens:
        if not on_super and (not first_only or not out.tokens):
            decision = router.decide(logits)
            out.energies.append(decision.energy)
            if decision.deferred:
                on_super = True
                missing = [*prompt, *out.tokens]
                out.super_prefill_tokens += len(missing)
                out.super_forwards += 1
                logits = super_.prefill(SLOT, missing)
        token = int(logits.argmax())
        out.tokens.append(token)
        out.by_super.append(on_super)
        if token in eos or len(out.tokens) >= max_tokens:
            break
        if on_super:
            out.super_forwards += 1
        logits = (super_ if on_super else swift).decode([token])[0]
    return out


@torch.inference_mode()
def generate_with_verification(swift: ModelRunner, super_: ModelRunner, prompt: list[int], router: Router,
                               max_tokens: int, window: int, eos: set[int] | frozenset[int] = frozenset(),
                               ) -> DeferredGeneration:
    """Greedy generation where a spike makes the super model verify up to ``window`` unverified
    swift tokens and produce the next token, all in one catch-up forward (``window=0`` is
    :func:`generate_with_deferral`). ``by_super`` marks the tokens the super model produced."""
    if not prompt:
        raise ValueError("generation needs a non-empty prompt")
    if window < 0:
        raise ValueError(f"the verification window must be >= 0, got {window}")
    swift.free(SLOT)
    super_.free(SLOT)
    sequence = list(prompt)
    approved = len(prompt)  # leading tokens the super model produced or checked (or the prompt)
    out = DeferredGeneration()
    logits = swift.prefill(SLOT, sequence)
    while len(sequence) - len(prompt) < max_tokens:
        decision = router.decide(logits)
        out.energies.append(decision.energy)
        if decision.deferred:
            n, start = len(sequence), super_.lengths[SLOT]
            out.super_prefill_tokens += n - start
            out.super_forwards += 1
            preds = super_.prefill(SLOT, sequence[start:], logits_for_all=True).argmax(-1).tolist()
            # preds[i] is the super model's token for position start + i + 1
            first = max(n - window, approved)
            cut = next((j for j in range(first, n) if preds[j - start - 1] != sequence[j]), n)
            token = preds[cut - start - 1]
            if cut < n:  # rejected from ``cut`` on: both caches back to the accepted prefix
                out.rejected += n - cut
                del sequence[cut:]
                del out.by_super[cut - len(prompt):]
                super_.rewind(SLOT, cut)
                swift.rewind(SLOT, cut)
            by_super = True
        else:
            token, by_super = int(logits.argmax()), False
        sequence.append(token)
        out.by_super.append(by_super)
        if by_super:
            approved = len(sequence)
        if token in eos or len(sequence) - len(prompt) >= max_tokens:
            break
        logits = swift.decode([token])[0]
    out.tokens = sequence[len(prompt):]
    return out
