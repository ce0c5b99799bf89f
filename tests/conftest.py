"""Shared pytest fixtures for the lmoe tests."""

from __future__ import annotations

import pytest

# ---------------------------------------------------------------------------------------------
# tiny_tokenizer: a word-level tokenizer built locally (no network), one token per
# whitespace-separated word, so tests can count tokens by eye.

TINY_SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]  # ids 0, 1, 2, 3
TINY_WORDS = ["the", "cat", "sat", "on", "mat", "dog", "ran", "Question:", "Answer:", "yes", "no",
              "a", "b", "c", "d", "e", "f", "g", "h"]


def build_tiny_tokenizer(add_bos: bool = True, pad: bool = True):
    """A ``PreTrainedTokenizerFast`` over ``TINY_SPECIALS + TINY_WORDS``; unknown words map to ``<unk>``.

    ``add_bos=True`` makes ``tokenizer(text)`` prepend ``<bos>`` (as Llama-2 does); ``False`` adds
    nothing (as SmolLM2 does). ``pad=False`` leaves the pad token unset.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(TINY_SPECIALS + TINY_WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>", pad_token="<pad>" if pad else None)


@pytest.fixture
def tiny_tokenizer():
    """Word-level tokenizer that adds ``<bos>`` (id 1); eos ``<eos>`` = 2, pad ``<pad>`` = 0."""
    return build_tiny_tokenizer(add_bos=True)


@pytest.fixture
def tiny_tokenizer_no_bos():
    """Like ``tiny_tokenizer`` but adds no special tokens, as SmolLM2's tokenizer."""
    return build_tiny_tokenizer(add_bos=False)


@pytest.fixture(autouse=True)
def _one_torch_thread(request):
    """Tiny models run fastest on one thread (no OpenMP barriers); the SmolLM2 tests keep the default."""
    import torch

    if request.node.get_closest_marker("slow"):
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
