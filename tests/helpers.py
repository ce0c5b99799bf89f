"""Small shared builders for the lmoe tests: a seeded 2-layer 64-dim Llama and adapter tweaks."""

from __future__ import annotations

import torch
import torch.nn as nn

VOCAB = 128


def tiny_llama(seed: int = 0, vocab_size: int = VOCAB):
    """A 2-layer, 64-dim LlamaForCausalLM (float32, eager attention), identical for equal seeds."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1,
                      eos_token_id=2, attn_implementation="eager")
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def random_ids(batch: int = 2, seq: int = 10, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, seq), generator=g)  # (B, S), no pad/bos/eos ids


@torch.no_grad()
def randomize_lora_B(module: nn.Module, seed: int = 2, std: float = 0.1) -> None:
    """Give every LMoELinear a non-zero B (it is zero at init), in place, keeping its storage layout."""
    from lmoe import LMoELinear

    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, LMoELinear):
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g, dtype=torch.float64) * std)


class TwoLinears(nn.Module):
    """A plain custom module with Linear children (no transformers involved)."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.up = nn.Linear(d, 2 * d)
        self.act = nn.ReLU()
        self.down = nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.up(x)))


def save_tiny_model_dir(path):
    """Save the tiny word-level tokenizer and a tiny Llama with exactly its vocabulary to ``path``."""
    from tests.conftest import build_tiny_tokenizer

    tok = build_tiny_tokenizer(add_bos=True)
    tiny_llama(vocab_size=len(tok)).save_pretrained(path)  # every generated id decodes to a word
    tok.save_pretrained(path)
    return tok


def float64_layer(d_in: int, d_out: int, seed: int = 0, router_scale: float = 1.0, **config):
    """An ``LMoELinear`` in float64 (routers too: float32 by design, float64 here so that a per-token loop can
    match it to 1e-12), with random B (and perturbed cores, and an awake sparsegen MLP) so nothing is trivial."""
    from lmoe import LMoEConfig, LMoELinear

    torch.manual_seed(seed)
    base = nn.Linear(d_in, d_out).double()
    layer = LMoELinear(base, LMoEConfig(target_modules=["x"], **config)).double()
    for m in (layer.router, layer.sparsegen_mlp):
        if m is not None:
            m.double()
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.3)
        if layer.lora_C is not None:
            layer.lora_C.add_(0.3 * torch.randn_like(layer.lora_C))
        if layer.router is not None:
            layer.router.weight.mul_(router_scale)
        if layer.sparsegen_mlp is not None:  # at LD-MoLE's init (biases -2.5) most hidden ReLUs are off: wake them
            for p in layer.sparsegen_mlp.parameters():
                p.normal_(0, 1.0)
    return layer


def float64_input(tokens: int, d_in: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, d_in, generator=g, dtype=torch.float64, requires_grad=True)


def assert_matches_reference(layer: nn.Module, y: torch.Tensor, y_ref: torch.Tensor, x: torch.Tensor,
                             all_grads: bool = False) -> None:
    """Outputs equal to 1e-12 and the gradients of every trainable parameter and of x to 1e-10 (the same
    random cotangent for both); ``all_grads``: every one of them must be reached."""
    assert torch.allclose(y, y_ref, atol=1e-12)
    params = [p for p in layer.parameters() if p.requires_grad] + [x]
    w = torch.randn_like(y)
    g = torch.autograd.grad((y * w).sum(), params, allow_unused=True)
    g_ref = torch.autograd.grad((y_ref * w).sum(), params, allow_unused=True)
    for a, b in zip(g, g_ref):
        if all_grads:
            assert a is not None and b is not None
        assert (a is None and b is None) or torch.allclose(a, b, atol=1e-10)
