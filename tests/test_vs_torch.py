"""benchmarks/vs_torch.py's PyTorch configurations on the smallest SD1.5-structured UNet: ComfyUI's weight patching
and PEFT/kohya's activation bypass train the same adapters to the same losses (the benchmark itself checks every
configuration against jaxlora's compiled step before timing it)."""

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import vs_torch  # noqa: E402

from jaxlora.models.demo import write_random_checkpoint  # noqa: E402

STEPS = 2
RTOL = 1e-5  # fp32, two torch forms of the same step: summation order only


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """The prepared jaxlora network (not compiled) and the files both sides load."""
    folder = tmp_path_factory.mktemp("vs_torch")
    args = SimpleNamespace(width=32, latent=8, batch=1, rank=4)
    unet_config = vs_torch.sd15_shaped(args.width)
    checkpoint = write_random_checkpoint(unet_config, folder / "model.safetensors")
    config_dir = folder / "diffusers"
    config_dir.mkdir()
    (config_dir / "config.json").write_text(json.dumps(vs_torch.diffusers_config(unet_config)))
    config = vs_torch.train_config(args, "fp32", remat=False)
    prepared = vs_torch.prepared_network(args, config, checkpoint, unet_config)
    return prepared, config, checkpoint, config_dir


def torch_losses(case, torch_config: str) -> tuple[list[float], dict]:
    prepared, config, checkpoint, config_dir = case
    side = vs_torch.torch_side(prepared, config, STEPS, checkpoint, config_dir, torch_config)
    counts = vs_torch.adapted_counts(prepared.network, side)  # raises where the trainable sets differ
    return [float(side.step(i)) for i in range(STEPS)], counts


def test_bypass_and_patched_torch_lora_train_the_same_adapters_to_the_same_losses(case):
    patched, patched_counts = torch_losses(case, "patch")
    bypassed, bypassed_counts = torch_losses(case, "bypass")
    assert patched_counts == bypassed_counts and patched_counts["torch LoRA"] > 0
    # the second loss follows a backward and an AdamW update: equal losses there need equal gradients
    np.testing.assert_allclose(bypassed, patched, rtol=RTOL)
    assert patched[0] != patched[1]


@pytest.mark.slow
def test_compiled_bypass_trains_to_the_eager_losses(case):
    eager, _ = torch_losses(case, "bypass")
    compiled, _ = torch_losses(case, "bypass+compile")
    np.testing.assert_allclose(compiled, eager, rtol=vs_torch.CHECK_RTOL)
