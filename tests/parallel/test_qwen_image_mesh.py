"""Qwen-Image trains over a device mesh of the 8 simulated CPU devices (tests/conftest.py) as on one device: the
same run as test_mesh.py's, on the tiny Qwen-Image with its stacked dual-stream blocks split by the fsdp rules,
its one-frame 5-D latents and its text context. Same tolerances (`assert_same_training`)."""

import pytest

from jaxlora import load_model
from jaxlora.models.demo import write_random_checkpoint
from jaxlora.models.qwen_image_family import TINY_QWEN_IMAGE
from jaxlora.train.loop import train_lora
from tests.parallel.test_mesh import RUN, assert_same_training
from tests.train.test_qwen_image_train import qwen_image_data

MESH = "data=2,fsdp=4"


# Two compiles of the scanned blocks' backward (one per mesh): in the `slow` set.
@pytest.mark.slow
def test_qwen_image_trains_on_a_mesh_of_8_devices_as_on_one(tmp_path):
    path = write_random_checkpoint(TINY_QWEN_IMAGE, tmp_path / "qwen.safetensors", seed=4)
    latents, conditioning = qwen_image_data(count=8, size=4)
    single = train_lora(load_model(path, "fp32"), latents, conditioning, **RUN)
    sharded = train_lora(load_model(path, "fp32", mesh=MESH), latents, conditioning, mesh=MESH, **RUN)
    assert_same_training(sharded, single)
    assert "diffusion_model.transformer_blocks.1.attn.to_q.lora_up.weight" in sharded.lora
