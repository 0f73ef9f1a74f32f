"""Manual check: token mode (takeover) and logprobs with a remote super model, e.g. stock vLLM.

Start the upstream first (ROUTING.md, "vLLM as the super model"), then
``python bench/routing_vllm_check.py --upstream http://127.0.0.1:8411 --swift /tmp/r16b/fq-w4-aw``.
tau is put between the swift energies so that the super model takes over at a step >= 2; the
routed answer must equal the swift tokens up to there plus the upstream's own greedy continuation
of prompt + those tokens (sent as token ids), with the upstream's logprobs.
"""
import argparse
import json

import httpx
import torch

from llmcomp.loading import load_model
from llmcomp.routing import RouterConfig
from llmcomp.serve.app import ServerConfig, create_app
from llmcomp.serve.background import BackgroundServer
from llmcomp.serve.remote_engine import RemoteEngine
from llmcomp.serve.routed_engine import RoutedEngine

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--upstream", default="http://127.0.0.1:8411")
ap.add_argument("--upstream-model", default="super")
ap.add_argument("--swift", required=True)
ap.add_argument("--prompt", default="The capital of France is")
ap.add_argument("--steps", type=int, default=12)
args = ap.parse_args()
UP, PROMPT, STEPS = args.upstream, args.prompt, args.steps
swift, tok = load_model(args.swift)
ids = tok(PROMPT).input_ids
seq, energies = list(ids), []
with torch.no_grad():
    for _ in range(STEPS):
        last = swift(input_ids=torch.tensor([seq])).logits[0, -1].float()
        energies.append(float(-torch.logsumexp(last, 0)))
        seq.append(int(last.argmax()))
at = next(i for i in range(2, STEPS) if energies[i] > max(energies[:i]) + 1e-2)
tau = (max(energies[:at]) + energies[at]) / 2
print("energies", [round(e, 2) for e in energies], "takeover at", at, "tau", tau)
swift_ids = seq[len(ids):len(ids) + at]
# reference: vLLM's own greedy continuation of prompt + the swift tokens (token-id prompt)
ref = httpx.post(f"{UP}/v1/completions", timeout=300, json={
    "model": args.upstream_model, "prompt": ids + swift_ids, "max_tokens": STEPS - at, "temperature": 0,
    "ignore_eos": True,
    "return_token_ids": True, "logprobs": 2, "return_tokens_as_token_ids": True}).json()["choices"][0]
print("vLLM direct token_ids", ref["token_ids"], "logprob tokens", ref["logprobs"]["tokens"][:3],
      "top", ref["logprobs"]["top_logprobs"][:1])
engine = RoutedEngine(swift, None, tok, RouterConfig(tau=tau, mode="token"), max_batch_size=2, max_queue=4,
                      context_length=512, super_engine=RemoteEngine(UP, max_batch_size=2, max_queue=4))
try:
    with BackgroundServer(create_app(engine, ServerConfig("routed"))) as url:
        req = {"model": "routed", "prompt": PROMPT, "max_tokens": STEPS, "temperature": 0, "ignore_eos": True,
               "logprobs": 2, "return_token_ids": True}
        body = httpx.post(f"{url}/v1/completions", json=req, timeout=300).json()
        c = body["choices"][0]
        print("routed", body["routed_to"], "deferred", body["deferred_tokens"], "usage", body["usage"])
        print("routed token_ids", c["token_ids"])
        print("expected         ", swift_ids + ref["token_ids"])
        print("text", repr(c["text"]), "==", repr(tok.decode(swift_ids + ref["token_ids"])))
        print("super logprobs equal vLLM's:", c["logprobs"]["token_logprobs"][at:] == ref["logprobs"]["token_logprobs"])
        with httpx.stream("POST", f"{url}/v1/completions", json={**req, "stream": True}, timeout=300) as s:
            chunks = [json.loads(x[6:]) for x in s.iter_lines() if x.startswith("data: {")]
        print("stream routes", [ch["choices"][0]["routed_to"] for ch in chunks if ch["choices"]])
        print("stream text equal:", "".join(ch["choices"][0]["text"] for ch in chunks if ch["choices"]) == c["text"])
finally:
    engine.close()
