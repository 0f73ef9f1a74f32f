"""Healing: only the factors train, the distillation loss drops, interrupts and resumes are exact."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import llmcomp  # noqa: F401
from llmcomp.errors import CheckpointError
from llmcomp.healing import HealConfig, distill_loss, heal, state_dir
from llmcomp.pipeline import compress
from llmcomp.recipes import recipe_from_dict

# KL only: on a random tiny model the LM term would pull the student toward the text, away from the teacher.
CFG = HealConfig(steps=6, lr=1e-3, batch_size=2, seq_len=24, num_samples=6, checkpoint_every=2, lm_weight=0.0)


def tensors(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path / "model.safetensors"), framework="pt") as fh:
        return {n: fh.get_tensor(n) for n in fh.keys()}  # noqa: SIM118


@pytest.fixture(scope="module")
def mpo_ckpt(tiny_llama_dir, tmp_path_factory):
    recipe = recipe_from_dict({"passes": [{"type": "tensornet", "ratio": 0.3, "dense_first_blocks": 1}]})
    return compress(str(tiny_llama_dir), recipe, tmp_path_factory.mktemp("heal") / "mpo", progress=False).output_dir


@pytest.fixture(scope="module")
def straight(mpo_ckpt, tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "healed"
    result = heal(mpo_ckpt, str(tiny_llama_dir), out, CFG, progress=False)
    return out, result


def kl_on(model_dir, teacher_dir, ids) -> float:
    student = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    with torch.no_grad():
        _, kl, _ = distill_loss(student(ids).logits, teacher(ids).logits, ids, CFG)
    return kl


def test_only_cores_change_and_kl_drops(mpo_ckpt, tiny_llama_dir, straight) -> None:
    out, result = straight
    assert result.steps_done == CFG.steps and not result.interrupted
    before, after = tensors(mpo_ckpt), tensors(out)
    assert before.keys() == after.keys()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    cores = {n for n in before if ".core_" in n}
    assert changed and changed <= cores
    ids = torch.randint(0, 2000, (2, 24), generator=torch.Generator().manual_seed(5))
    assert kl_on(out, tiny_llama_dir, ids) < kl_on(mpo_ckpt, tiny_llama_dir, ids)
    assert not state_dir(out).exists()


def test_ctrl_c_keeps_the_last_step_and_resume_is_bit_identical(mpo_ckpt, tiny_llama_dir, straight, tmp_path) -> None:
    out = tmp_path / "healed"

    def interrupt_at_3(step, _record):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    result = heal(mpo_ckpt, str(tiny_llama_dir), out, CFG, progress=False, on_step=interrupt_at_3)
    assert result.interrupted and result.steps_done == 3
    assert (state_dir(out) / "state.pt").is_file()
    AutoModelForCausalLM.from_pretrained(out)  # the interrupted output is a usable checkpoint
    resumed = heal(mpo_ckpt, str(tiny_llama_dir), out, CFG, progress=False, resume=True)
    assert resumed.steps_done == CFG.steps and [h["step"] for h in resumed.history] == list(range(1, 7))
    ref, got = tensors(straight[0]), tensors(out)
    assert all(torch.equal(ref[n], got[n]) for n in ref)


def test_crash_resumes_from_the_periodic_state(mpo_ckpt, tiny_llama_dir, straight, tmp_path) -> None:
    out = tmp_path / "healed"

    def crash_at_5(step, _record):
        if step == 5:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError):
        heal(mpo_ckpt, str(tiny_llama_dir), out, CFG, progress=False, on_step=crash_at_5)
    assert not out.exists()
    assert torch.load(state_dir(out) / "state.pt", weights_only=False)["step"] == 4
    with pytest.raises(CheckpointError, match="other inputs or settings"):
        heal(mpo_ckpt, str(tiny_llama_dir), out, HealConfig(**{**CFG.__dict__, "lr": 1e-2}), progress=False,
             resume=True)
    heal(mpo_ckpt, str(tiny_llama_dir), out, CFG, progress=False, resume=True)
    ref, got = tensors(straight[0]), tensors(out)
    assert all(torch.equal(ref[n], got[n]) for n in ref)


def test_cli_rejects_a_checkpoint_without_factors(tiny_llama_dir, tmp_path) -> None:
    from llmcomp.cli.main import app

    rtn = compress(str(tiny_llama_dir), recipe_from_dict({"passes": [{"type": "rtn", "bits": 8}]}), tmp_path / "q",
                   progress=False).output_dir
    res = CliRunner().invoke(app, ["heal", str(rtn), "--teacher", str(tiny_llama_dir), "-o", str(tmp_path / "h")])
    assert res.exit_code == 2 and "nothing to heal" in res.output
    res = CliRunner().invoke(app, ["heal", str(tiny_llama_dir), "--teacher", str(tiny_llama_dir),
                                   "-o", str(tmp_path / "h")])
    assert res.exit_code == 2 and "error" in res.output


def test_balance_cores_option_balances_tt_svd_cores_before_training(tiny_llama_dir, tmp_path) -> None:
    """With a negligible learning rate the healed cores are the input's cores, balanced (or untouched without
    the option); the balanced ones equal ``balance_cores`` of the stored cores and keep the product."""
    from llmcomp.modules.mpo_linear import mpo_to_matrix
    from llmcomp.passes.tensornet import balance_cores

    recipe = recipe_from_dict({"passes": [{"type": "tensornet", "ratio": 0.3, "dense_first_blocks": 1,
                                           "balance_cores": False}]})
    plain = compress(str(tiny_llama_dir), recipe, tmp_path / "mpo", progress=False).output_dir
    cfg = HealConfig(steps=1, lr=1e-12, batch_size=2, seq_len=16, num_samples=2, lm_weight=0.0)
    source = tensors(plain)
    for balance in (False, True):
        out = tmp_path / f"h{balance}"
        heal(plain, str(tiny_llama_dir), out, HealConfig(**{**cfg.__dict__, "balance_cores": balance}), progress=False)
        got = tensors(out)
        prefixes = sorted({n.rsplit(".", 1)[0] for n in source if n.endswith(".core_0")})
        assert prefixes
        for prefix in prefixes:
            cores = [source[f"{prefix}.core_{k}"].double() for k in range(2)]
            want = balance_cores(cores) if balance else cores
            for k in range(2):
                torch.testing.assert_close(got[f"{prefix}.core_{k}"].double(), want[k], rtol=0, atol=1e-6)
            torch.testing.assert_close(mpo_to_matrix([got[f"{prefix}.core_{k}"].double() for k in range(2)]),
                                       mpo_to_matrix(cores), rtol=0, atol=1e-5)
        assert all(torch.equal(got[n], source[n]) for n in source if ".core_" not in n)
    assert not torch.allclose(tensors(tmp_path / "hTrue")[f"{prefixes[0]}.core_0"], source[f"{prefixes[0]}.core_0"])
