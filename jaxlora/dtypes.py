"""The dtype and prediction names users pass (flags, TOML, metadata), defined once. Imports no JAX, so the
command line can check its arguments before JAX loads."""

from __future__ import annotations

import ml_dtypes
import numpy as np

# accepted name -> dtype of stored weights and adapters
DTYPES = {
    "bf16": np.dtype(ml_dtypes.bfloat16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "fp32": np.dtype(np.float32),
    "float32": np.dtype(np.float32),
    "fp16": np.dtype(np.float16),
    "float16": np.dtype(np.float16),
}
WEIGHT_DTYPES = ("bf16", "fp32", "fp16")  # what a checkpoint may be loaded as
TRAINING_DTYPES = ("bf16", "fp32")  # the node's choices for training_dtype and lora_dtype
PREDICTIONS = ("auto", "eps", "v")  # "auto": the family's detection from the weights
_SHORT_NAMES = {"bfloat16": "bf16", "float32": "fp32", "float16": "fp16"}


def resolve_dtype(dtype) -> np.dtype:
    """A dtype from any accepted name, or a dtype-like passed through."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}")
        return DTYPES[dtype]
    return np.dtype(dtype)


def dtype_name(dtype) -> str:
    """ "bf16", "fp32" or "fp16" for a dtype or any of its accepted names."""
    name = resolve_dtype(dtype).name
    return _SHORT_NAMES.get(name, name)
