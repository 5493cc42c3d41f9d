"""A user's Hugging Face model: a factory module as a user writes it, with nothing of dasktrain in it.

The model is built from a config, so nothing is downloaded; its initial weights come from torch's
global generator, which dasktrain seeds before it calls the factory.
"""

from __future__ import annotations

import transformers


def gpt2(vocab_size: int = 256, context: int = 16, n_embd: int = 32, n_layer: int = 2,
         n_head: int = 2) -> transformers.GPT2LMHeadModel:
    """A small GPT-2 language model without dropout; its output head is tied to the token embedding."""
    config = transformers.GPT2Config(vocab_size=vocab_size, n_positions=context, n_embd=n_embd, n_layer=n_layer,
                                     n_head=n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                     bos_token_id=None, eos_token_id=None)  # GPT-2's 50256 is no byte
    return transformers.GPT2LMHeadModel(config)
