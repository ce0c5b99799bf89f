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
