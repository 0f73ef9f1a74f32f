"""Token-level deferral during generation (E-LANG per token, in the spirit of Big Little Decoder's
fallback): the swift model proposes every token; when its energy at a step is above ``tau`` the
super model produces that token instead.

KV caches: the swift runner's cache always holds the whole sequence (its own tokens and the super
model's, fed back as its next input). The super runner's cache holds a *prefix* of the same
sequence: at a deferral it is caught up by prefilling every token it has not seen yet (one chunked
forward, not one decode per token), then its next-token logits pick the token. Super tokens are
final (no rollback, no verification of a window of swift tokens), so the two caches never
disagree: each is always a prefix of the one token sequence. Greedy decoding only.
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
