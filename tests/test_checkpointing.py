"""Activation (gradient) checkpointing through LMoEModel gives the gradients of a plain backward.

The tiny 2-layer Llama with expert dropout on: the recomputation must replay the RNG (non-reentrant
checkpointing does), or the dropout masks, and so the gradients, would differ.
"""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from lmoe import LMoEConfig, LMoELinear, LMoEModel, cli
from tests.helpers import save_tiny_model_dir, random_ids, randomize_lora_B, tiny_llama


def _grads(model, ids, mask):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)  # the same dropout masks in both runs
    out = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_checkpointing_gives_the_same_gradients():
    model = LMoEModel(tiny_llama(), LMoEConfig(num_experts=4, rank=4, dropout=0.1, aux_loss_coef=1e-2,
                                               z_loss_coef=1e-3))
    randomize_lora_B(model)  # B = 0 at init would zero every gradient of A
    model.train()
    ids = random_ids(batch=2, seq=12)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # some padding

    calls = []
    layer = next(m for m in model.modules() if isinstance(m, LMoELinear))
    layer.register_forward_hook(lambda *a: calls.append(1))

    loss_plain, plain = _grads(model, ids, mask)
    assert len(calls) == 1
    model.gradient_checkpointing_enable()
    calls.clear()
    loss_ckpt, ckpt = _grads(model, ids, mask)
    assert len(calls) == 2  # the layer really ran again in backward

    assert torch.equal(loss_plain, loss_ckpt)
    assert plain.keys() == ckpt.keys() and len(plain) == 3 * 7 * 2  # A, B, router of 7 Linears in 2 layers
    for n in plain:
        assert plain[n].abs().sum() > 0, n
        torch.testing.assert_close(ckpt[n], plain[n], atol=1e-6, rtol=0, msg=n)


def test_train_flag_gives_the_same_adapter(tmp_path, monkeypatch):
    tok = save_tiny_model_dir(tmp_path / "model")
    rows = [{"prompt": "the cat sat", "answer": " on the mat"}, {"prompt": "the dog", "answer": " ran"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows * 4))
    argv = ["train", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "d.jsonl"), "--max-steps", "3",
            "--batch-size", "4", "--seq-len", "32", "--num-experts", "4", "--rank", "2", "--dropout", "0.1",
            "--lr", "1e-3"]
    calls = []
    real = LMoELinear.forward
    monkeypatch.setattr(LMoELinear, "forward", lambda self, x: calls.append(1) or real(self, x))
    assert cli.main([*argv, "--output-dir", str(tmp_path / "plain")]) == 0
    plain_calls, calls[:] = len(calls), []
    assert cli.main([*argv, "--output-dir", str(tmp_path / "ckpt"), "--gradient-checkpointing"]) == 0
    assert len(calls) == 2 * plain_calls  # every layer recomputed in backward: checkpointing was on
    a = load_file(tmp_path / "plain" / "adapter_model.safetensors")
    b = load_file(tmp_path / "ckpt" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0, msg=k)
