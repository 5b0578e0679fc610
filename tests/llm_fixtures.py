"""Tiny random causal language models built from a config, with a tokenizer trained here.

Nothing is downloaded: the tokenizer is a byte-level BPE trained on a few sentences (the
``tokenizers`` library), saved as a GPT-2 style fast tokenizer that transformers and ONNX Runtime
GenAI both read; the models are random Llama and GPT-2 checkpoints of a few hundred kB, saved as
safetensors with ``config.json`` and ``generation_config.json`` as ``save_pretrained`` writes them.
"""

from __future__ import annotations

import json
from pathlib import Path

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a language model predicts the next token from the ones before it",
    "quantized weights make decoding faster when memory bandwidth bounds it",
    "fine tuning with low rank adapters trains a few megabytes of weights",
    "perplexity is the exponential of the mean negative log likelihood",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20",
    '{"answer": 42, "ok": true}',
]

VOCAB = 320
CONTEXT = 128


def build_tokenizer(folder: Path, vocab_size: int = VOCAB) -> None:
    """A byte-level BPE tokenizer (GPT-2 style) with a chat template, saved into ``folder``."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        CORPUS * 4, vocab_size=vocab_size, min_frequency=1, special_tokens=["<|endoftext|>"]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=CONTEXT,
    )
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    tok.save_pretrained(str(folder))
    # ONNX Runtime GenAI picks its tokenizer by class name: a GPT-2 byte-level BPE.
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "GPT2Tokenizer"
    config_path.write_text(json.dumps(config, indent=2))


def tiny_llama(folder: Path, *, seed: int = 0, hidden: int = 64, layers: int = 2) -> Path:
    """A random Llama checkpoint (about 0.2 M parameters) with its tokenizer, in ``folder``."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=CONTEXT,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    model.generation_config = GenerationConfig(bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model.save_pretrained(str(folder))
    build_tokenizer(folder)
    return folder


def tiny_gpt2(folder: Path, *, seed: int = 0, hidden: int = 64, layers: int = 2) -> Path:
    """A random GPT-2 checkpoint with its tokenizer, in ``folder``."""
    import torch
    from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_embd=hidden,
        n_layer=layers,
        n_head=4,
        n_positions=CONTEXT,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = GPT2LMHeadModel(config).eval()
    model.generation_config = GenerationConfig(bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model.save_pretrained(str(folder))
    build_tokenizer(folder)
    return folder
