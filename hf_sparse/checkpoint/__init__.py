"""Sparse checkpoints: sparsity metadata in `config.json`, the compact N:M format, and a loader that checks both.

A squashed sparse model is an ordinary `transformers` model whose pruned weights are exact zeros, so
`model.save_pretrained(path)` already writes a checkpoint that plain `AutoModel*.from_pretrained(path)` loads.
This package adds:

- `attach_sparsity_metadata` (`metadata.py`): records in `model.config.sparsity` (saved in `config.json`) the
  pattern, the sparse layers, the criterion, per-layer and total sparsity and the library version;
- `save_pretrained(model, path, compact=True)` (`pretrained.py`): stores every N:M layer as its kept values plus the
  positions of those values (2 bits each for 2:4), about 56% of the bytes of the fp16 layer, in one safetensors file
  (`compact.py`; FP8 layers by `compact_fp8.py`) with a sha256 of each layer in `config.json`, and a
  `quantization_config` that lets plain `from_pretrained` read it after `import hf_sparse` (`hf_sparse/quantizer.py`);
- `from_pretrained` (`pretrained.py`): loads either format (`standard.py`, `compact.py`) from a folder or a Hub repo
  and checks that every layer the metadata calls sparse really is N:M, finite and, if compact, as saved (its
  checksum), naming the layer and the file when it is not;
- `files.py`: saves that never leave a checkpoint half written, and the Trainer checkpoint a run can resume from.
"""

from .compact import COMPACT_FORMAT, COMPACT_WEIGHTS_NAME, MISSING_LIBRARY_MESSAGE, QUANT_METHOD
from .compact_fp8 import COMPACT_FP8_FORMAT, FP8_INPUT_SCALE_SUFFIX, FP8_SCALE_SUFFIX
from .files import atomic_path, checkpoint_problem, last_complete_checkpoint
from .metadata import (
    CONFIG_NAME,
    METADATA_KEY,
    SparseCheckpointError,
    attach_sparsity_metadata,
    sparsity_metadata,
)
from .packing import INDICES_SUFFIX, VALUES_SUFFIX, compact_decode, compact_encode
from .pretrained import from_pretrained, load_state_dict, save_pretrained
from .standard import DENSE_INDEX_NAME, DENSE_WEIGHTS_NAME

__all__ = [
    "COMPACT_FORMAT",
    "COMPACT_FP8_FORMAT",
    "COMPACT_WEIGHTS_NAME",
    "CONFIG_NAME",
    "DENSE_INDEX_NAME",
    "DENSE_WEIGHTS_NAME",
    "FP8_INPUT_SCALE_SUFFIX",
    "FP8_SCALE_SUFFIX",
    "INDICES_SUFFIX",
    "METADATA_KEY",
    "MISSING_LIBRARY_MESSAGE",
    "QUANT_METHOD",
    "VALUES_SUFFIX",
    "SparseCheckpointError",
    "atomic_path",
    "attach_sparsity_metadata",
    "checkpoint_problem",
    "compact_decode",
    "compact_encode",
    "from_pretrained",
    "last_complete_checkpoint",
    "load_state_dict",
    "save_pretrained",
    "sparsity_metadata",
]
