"""A byte-level tokenizer built in code, for tests and offline demos of causal LMs: no download."""

from __future__ import annotations

# A minimal chat template in the ChatML layout SmolLM2, Qwen and others use, so that code paths taking
# `apply_chat_template` run on the synthetic tokenizer too.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_tokenizer():
    """A fast byte-level BPE tokenizer without merges: every UTF-8 byte is one token (ids 0-255), then `<|pad|>`
    (256), `<|endoftext|>` (257, also the BOS token, prepended to every encoding), `<|im_start|>` (258) and
    `<|im_end|>` (259). Any text encodes and decodes exactly, and offsets are correct; a model built with
    `vocab_size=len(tokenizer)` (260) can read it.

    Example:

    ```python
    >>> from hf_sparse.lm.synthetic import byte_tokenizer
    >>> tokenizer = byte_tokenizer()
    >>> tokenizer("Hi").input_ids
    [257, 72, 105]
    ```
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    # ByteLevel maps byte b to a printable character; order the vocabulary by byte value so that id == byte
    byte_chars = sorted(alphabet, key=lambda c: _byte_of(c))
    vocab = {c: i for i, c in enumerate(byte_chars)}
    specials = ["<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    for token in specials:
        vocab[token] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    bos = vocab["<|endoftext|>"]
    backend.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", pair="<|endoftext|> $A $B", special_tokens=[("<|endoftext|>", bos)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _byte_of(char: str) -> int:
    """The byte that GPT-2's byte-level alphabet shows as `char` (printable bytes as themselves, the others shifted
    past 255)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    if ord(char) in printable:
        return ord(char)
    others = [b for b in range(256) if b not in printable]
    return others[ord(char) - 256]
