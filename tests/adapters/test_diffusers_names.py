"""`unet_to_diffusers` (our ldm -> diffusers name table) against diffusers' own single-file converter,
`convert_ldm_unet_checkpoint`, which is written independently of it.

The checkpoint fed to the converter has every key of our network under `model.diffusion_model.`, each tensor
with its true torch shape and filled with its key's index; the converter only moves tensors to new keys, so
the fill value of each output tells which ldm key it came from. The tensors are zero-stride views
(`torch.tensor(i).expand(shape)`), so the full-size networks cost no memory.
"""

from __future__ import annotations

import pytest
import torch
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

from jaxlora.adapters.attach import weight_layers
from jaxlora.models.checkpoint import torch_parameters
from jaxlora.models.unet import SD15, SD21, SDXL, UNet
from jaxlora.models.unet_names import unet_to_diffusers
from tests.models.tiny_unets import FAMILIES

# The parts of the diffusers config the converter reads, for the full-size networks.
FULL_SIZE = {
    "SD15": (SD15, {"layers_per_block": 2}),
    "SD21": (SD21, {"layers_per_block": 2}),
    "SDXL": (SDXL, {"layers_per_block": 2, "addition_embed_type": "text_time"}),
}
CASES = {
    **{f"tiny-{name}": (family.config, family.diffusers_config) for name, family in FAMILIES.items()},
    **FULL_SIZE,
}


def diffusers_key_of_each_ldm_key(network, diffusers_config: dict) -> dict[str, str]:
    """ldm key (no prefix) -> the key diffusers' converter moves its tensor to."""
    shapes = {
        key: layer.torch_shape(name, getattr(layer, name).shape) for key, layer, name in torch_parameters(network)
    }
    keys = list(shapes)
    checkpoint = {
        f"model.diffusion_model.{key}": torch.tensor(float(index)).expand(shapes[key]) for index, key in enumerate(keys)
    }
    converted = convert_ldm_unet_checkpoint(checkpoint, diffusers_config)
    origin = {}
    for diffusers_key, tensor in converted.items():
        ldm_key = keys[int(tensor[(0,) * tensor.ndim])]
        assert tuple(tensor.shape) == shapes[ldm_key], f"{diffusers_key} <- {ldm_key}"
        assert ldm_key not in origin, f"{ldm_key} converted twice: {origin[ldm_key]}, {diffusers_key}"
        origin[ldm_key] = diffusers_key
    dropped = sorted(set(keys) - origin.keys())
    assert not dropped, f"diffusers' converter dropped {len(dropped)} keys, e.g. {dropped[:5]}"
    return origin


@pytest.mark.parametrize("case", list(CASES))
def test_unet_to_diffusers_names_every_layer_as_diffusers_single_file_converter_does(case):
    config, diffusers_config = CASES[case]
    network = UNet(config)
    paths = [path for path, _ in weight_layers(network)]
    converter = diffusers_key_of_each_ldm_key(network, diffusers_config)

    expected = {path: converter[f"{path}.weight"].removesuffix(".weight") for path in paths}
    ours = unet_to_diffusers(config, paths)

    wrong = {path: (ours.get(path), name) for path, name in expected.items() if ours.get(path) != name}
    assert not wrong, f"{len(wrong)} of {len(paths)} layers differ (ours, diffusers), e.g. {list(wrong.items())[:5]}"
    assert ours.keys() == expected.keys()
