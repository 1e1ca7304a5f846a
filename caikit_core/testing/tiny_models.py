"""Tiny, random, offline Hugging Face checkpoints for tests.

:func:`build_tiny_llama` writes a complete causal-LM checkpoint (a random
``LlamaForCausalLM``, a byte-level BPE tokenizer trained in-process on a small
built-in corpus, and a chat template) to a folder, with no network access. It
takes well under two seconds once torch and transformers are imported, and is
deterministic: the same arguments give the same weights and the same tokenizer.

torch, transformers and tokenizers are imported inside the function, so importing
this module is cheap.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = [
    "BOS_TOKEN",
    "CHAT_TEMPLATE",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "TINY_CORPUS",
    "build_tiny_llama",
]

BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
PAD_TOKEN = "<|pad|>"

#: A simple chat format: ``<|bos|>`` then, per turn, ``<|role|>\ncontent<|eos|>\n``;
#: the generation prompt opens an assistant turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

#: The text the tokenizer is trained on: plain English with chat-like turns.
TINY_CORPUS: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog.",
    "A helpful assistant answers questions honestly and harmlessly.",
    "Please explain why the sky is blue in simple words.",
    "The sky looks blue because air scatters blue light more than red light.",
    "Can you help me write a short poem about the sea?",
    "The sea is wide and deep, the waves roll in and out, and the gulls cry.",
    "I would rather not help with that, because it could hurt someone.",
    "Here is a safer way to think about the problem you described.",
    "Critique: the response was rude and did not answer the question.",
    "Revision: here is a polite and accurate answer to the question.",
    "Which of these responses is more helpful, honest and harmless?",
    "Option (A) is better than option (B) because it is kinder.",
    "user: hello there! assistant: hello, how can I help you today?",
    "system: you are a careful and friendly assistant.",
    "Numbers like 1, 2, 3, 10, 42 and 2024 appear in text too.",
    "Water boils at one hundred degrees at sea level.",
    "Good morning, good evening, thank you, you are welcome.",
    "What is the capital of France? The capital of France is Paris.",
    "To bake bread you need flour, water, salt and yeast.",
    "She said that the answer was correct, and he agreed with her.",
)


def build_tiny_llama(
    path: Path,
    *,
    seed: int = 0,
    vocab_size: int = 512,
    hidden_size: int = 32,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate_size: int = 64,
    max_position_embeddings: int = 256,
    initializer_range: float = 0.5,
) -> Path:
    """Write a tiny random Llama checkpoint with a trained byte-level tokenizer.

    :param path: the folder to write (created if missing); files in it are overwritten.
    :param seed: seeds the random weights (the tokenizer does not depend on it).
    :param vocab_size: the tokenizer's target vocabulary size (at least 300: the 256
        byte symbols, the special tokens and some merges); the model's embedding
        matrix has exactly the tokenizer's vocabulary size.
    :param hidden_size: the model width.
    :param layers: the number of decoder layers.
    :param heads: attention heads (must divide ``hidden_size``).
    :param kv_heads: key/value heads (must divide ``heads``).
    :param intermediate_size: the MLP width.
    :param max_position_embeddings: the model's context length.
    :param initializer_range: the weights' standard deviation; the default is large
        so that the random model's next-token distributions are peaked, which keeps
        greedy decoding away from near-ties.
    :returns: ``path``.
    """
    import tokenizers
    import torch
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    if vocab_size < 300:
        raise ValueError(f"vocab_size must be at least 300, got {vocab_size}")
    if hidden_size % heads or heads % kv_heads:
        raise ValueError(
            f"heads ({heads}) must divide hidden_size ({hidden_size}) "
            f"and kv_heads ({kv_heads}) must divide heads"
        )
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)

    # --- tokenizer: byte-level BPE trained on the built-in corpus ----------------
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        show_progress=False,
        special_tokens=[PAD_TOKEN, BOS_TOKEN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(list(TINY_CORPUS), trainer=trainer)
    tokenizer_class: Any = PreTrainedTokenizerFast
    tokenizer = tokenizer_class(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        padding_side="left",
        model_max_length=max_position_embeddings,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE

    # --- model: a random Llama of the tokenizer's vocabulary size ---------------
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_position_embeddings,
        initializer_range=initializer_range,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model_class: Any = LlamaForCausalLM
        model: Any = model_class(config)
    model.to(torch.float32)
    model.eval()

    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
