"""Convert an adapter file between key styles for a given model.

    python convert/convert_lora.py --model MODEL.safetensors IN.safetensors OUT.safetensors --style kohya

Reads any style ComfyUI loads (ComfyUI-native, kohya, LyCORIS, PEFT, diffusers) and writes `comfyui`, `kohya`
or `peft`. Only the model's header is read (its layer names and shapes). Keys that fit no layer of the model,
and layers the target style cannot name, are reported and nothing is written.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import ml_dtypes
import numpy as np

from jaxlora.adapters.attach import attach_imported
from jaxlora.adapters.formats import AdapterFileError, import_adapter
from jaxlora.adapters.lora_files import read_lora_file, save_lora
from jaxlora.adapters.metadata import adapter_info, trained_steps
from jaxlora.dtypes import WEIGHT_DTYPES
from jaxlora.models.diffusion import load_model
from jaxlora.models.family import STYLES


def stored_dtype(tensors) -> str:
    """The float dtype most of the file's tensors are stored in, kept for the output."""
    names = {np.dtype(ml_dtypes.bfloat16): "bf16", np.dtype(np.float16): "fp16"}
    return names.get(Counter(v.dtype for v in tensors.values()).most_common(1)[0][0], "fp32")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input", help="adapter file to convert")
    parser.add_argument("output", help="new file to write (never overwritten)")
    parser.add_argument("--model", required=True, help="the base checkpoint the adapter belongs to")
    parser.add_argument("--style", required=True, choices=STYLES)
    parser.add_argument("--lora-dtype", choices=WEIGHT_DTYPES, help="default: the input's dtype")
    args = parser.parse_args(argv)

    model = load_model(args.model, weights=False)
    tensors, metadata = read_lora_file(args.input)
    lora_dtype = args.lora_dtype or stored_dtype(tensors)
    try:
        attach_imported(model.network, import_adapter(model, tensors))
        settings = json.loads(metadata.get("training_settings", "{}"))
        info = adapter_info(model, lora_dtype, trained_steps(Path(args.input), metadata), settings=settings)
        path = save_lora(model, args.output, args.style, lora_dtype, info)
    except AdapterFileError as error:
        print(f"cannot convert {args.input}: {error}", file=sys.stderr)
        return 1
    print(f"wrote {path} ({args.style}, {lora_dtype}) from {len(tensors)} tensors of {args.input}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
