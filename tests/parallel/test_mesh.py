"""Training over a device mesh, on the 8 simulated CPU devices of tests/conftest.py: the mesh flag and rule
table, weights loaded straight onto their shards, and sharded runs that match the single-device run step for
step, through a checkpoint, a resume on another mesh, and the export.

The model is the cheapest UNet to compile (one level with every block type): each mesh is its own program."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxlora import load_model
from jaxlora.models.demo import demo_dataset, write_random_checkpoint
from jaxlora.parallel.distributed import initialize, spans_processes
from jaxlora.parallel.mesh import MeshError, fsdp_spec, make_mesh, per_device_bytes, resolve_sizes
from jaxlora.train.__main__ import build_parser, settings_from
from jaxlora.train.config import TrainConfig
from jaxlora.train.loop import train_lora
from tests.train.test_train import ONE_LEVEL

MESHES = ["data=8", "fsdp=8", "data=2,fsdp=4"]
# SGD moves the adapter linearly in the gradient, so a difference in the result is a difference in the gradient.
# (Adam's first steps are close to lr * sign(g) and would magnify fp32 rounding of near-zero gradients.)
RUN = dict(
    steps=2, batch_size=8, rank=2, optimizer="SGD", learning_rate=0.01, gradient_checkpointing=False,
    training_dtype="fp32", lora_dtype="fp32", progress=lambda line: None,
)  # fmt: skip


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_random_checkpoint(ONE_LEVEL, tmp_path_factory.mktemp("demo") / "unet.safetensors", seed=4)


@pytest.fixture(scope="module")
def data():
    return demo_dataset(8, 8)


@pytest.fixture(scope="module")
def single_device(checkpoint, data):
    return train_lora(load_model(checkpoint, "fp32"), *data, **RUN)


def assert_same_training(result, reference):
    """Losses to 1e-5 relative; every exported adapter tensor to 1e-5 of the largest change training made
    (the reductions over the batch and of the gradients run in another order on a mesh: fp32 rounding)."""
    np.testing.assert_allclose(result.loss_map["loss"], reference.loss_map["loss"], rtol=1e-5)
    assert result.lora.keys() == reference.lora.keys()
    scale = max(np.abs(value).max() for value in reference.lora.values())
    for key, value in reference.lora.items():
        np.testing.assert_allclose(result.lora[key], value, rtol=0, atol=1e-5 * scale, err_msg=key)


def test_mesh_sizes_fill_the_rest_and_must_match_the_devices():
    assert resolve_sizes("data=2,fsdp=4", 8) == {"data": 2, "fsdp": 4}
    assert resolve_sizes("fsdp=-1", 8) == {"data": 1, "fsdp": 8}
    assert resolve_sizes("data=2, fsdp=-1", 8) == {"data": 2, "fsdp": 4}
    mesh = make_mesh("data=-1,fsdp=2")
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2} and mesh.devices.size == jax.device_count()
    for spec, message in [
        ("data=2", "asks for 2 devices, but 8 are available"),
        ("data=3,fsdp=-1", "8 devices do not split into groups of 3"),
        ("data=-1,fsdp=-1", "only one axis may be -1"),
        ("tensor=2", "axes \\['data', 'fsdp'\\], got 'tensor=2'"),
        ("fsdp=4,fsdp=2", "'fsdp' is given twice"),
        ("fsdp=0", "positive size"),
    ]:
        with pytest.raises(MeshError, match=f"--mesh '{spec}'.*{message}"):
            resolve_sizes(spec, 8)
    with pytest.raises(MeshError, match="--mesh 'model=2'"):
        TrainConfig(mesh="model=2")


@pytest.mark.parametrize(
    ("path", "shape", "fsdp", "spec"),
    [
        ("out.2.weight", (3, 3, 32, 4), 4, P(None, None, None, "fsdp")),  # conv HWIO: output channels
        ("proj.weight", (64, 30), 4, P("fsdp", None)),  # linear [in, out]: out does not divide, in does
        ("proj.weight", (6, 10), 4, P(None, None)),  # neither divides: replicated
        ("conv.weight", (4, 4, 3, 5), 4, P(None, None, None, None)),  # never a kernel's spatial axis
        ("double_blocks.img_attn.qkv.weight", (8, 6, 6), 4, P(None, None, None)),  # never a stacked block axis
        ("double_blocks.img_attn.qkv.weight", (8, 64, 192), 8, P(None, None, "fsdp")),
        ("norm.weight", (64,), 4, P(None)),  # vectors: replicated
        ("double_blocks.img_attn.qkv.bias", (8, 192), 8, P(None, None)),  # biases, stacked or not: replicated
        ("proj.weight", (64, 64), 1, P(None, None)),
    ],
)
def test_rule_table_splits_feature_axes_only(path, shape, fsdp, spec):
    assert fsdp_spec(path, shape, fsdp) == spec


def test_loading_onto_a_mesh_splits_the_base_by_the_fsdp_factor(checkpoint):
    single = nnx.state(load_model(checkpoint, "fp32").network, nnx.Param)
    for spec, fsdp in [("fsdp=8", 8), ("data=2,fsdp=4", 4)]:
        sharded = nnx.state(load_model(checkpoint, "fp32", mesh=spec).network, nnx.Param)
        leaves = jax.tree.leaves(sharded)
        split = sum(leaf.nbytes for leaf in leaves if not leaf.sharding.is_fully_replicated)
        whole = sum(leaf.nbytes for leaf in leaves if leaf.sharding.is_fully_replicated)
        assert whole < 0.01 * (split + whole)  # only biases and norm scales stay whole
        held = per_device_bytes(sharded)
        assert len(held) == 8 and set(held.values()) == {split // fsdp + whole}, held
        for a, b in zip(jax.tree.leaves(single), leaves, strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("mesh", MESHES)
def test_sharded_training_matches_one_device(checkpoint, data, single_device, mesh):
    result = train_lora(load_model(checkpoint, "fp32", mesh=mesh), *data, mesh=mesh, **RUN)
    assert_same_training(result, single_device)
    base = nnx.state(result.model_with_lora.network, nnx.Param)
    assert {leaf.sharding.mesh.shape_tuple for leaf in jax.tree.leaves(base)} == {make_mesh(mesh).shape_tuple}


def test_sharded_run_resumes_on_another_mesh_to_the_same_adapter(checkpoint, data, single_device, tmp_path):
    def killed_after_step_1(line):
        if line.startswith("step 1/"):
            raise RuntimeError("killed")

    folder = tmp_path / "checkpoints"
    with pytest.raises(RuntimeError, match="killed"):
        train_lora(load_model(checkpoint, "fp32", mesh="data=2,fsdp=4"), *data, mesh="data=2,fsdp=4",
                   checkpoint_dir=folder, checkpoint_every=1, log_every_seconds=0,
                   **{**RUN, "progress": killed_after_step_1})  # fmt: skip
    resumed = train_lora(
        load_model(checkpoint, "fp32"), *data, mesh="fsdp=8", checkpoint_dir=folder, resume=True, **RUN
    )
    assert_same_training(resumed, single_device)


def test_batch_that_does_not_split_over_the_mesh_is_refused_before_compiling(checkpoint, data):
    with pytest.raises(MeshError, match="batch_size 4 gives batches of 4, .* 8 devices of --mesh 'data=2,fsdp=4'"):
        train_lora(
            load_model(checkpoint, "fp32", weights=False), *data, mesh="data=2,fsdp=4", **{**RUN, "batch_size": 4}
        )


def test_mesh_and_distributed_flags():
    args = build_parser().parse_args(["--mesh", "data=2,fsdp=-1", "--distributed"])
    settings = settings_from(args)
    assert args.distributed and settings["mesh"] == "data=2,fsdp=-1" and "distributed" not in settings


@pytest.mark.parametrize(
    ("env", "spans"),
    [
        ({}, False),
        ({"SLURM_NTASKS": "1"}, False),
        ({"SLURM_NTASKS": "4"}, True),
        ({"OMPI_COMM_WORLD_SIZE": "2"}, True),
        ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "2"}, True),
        ({"TPU_WORKER_HOSTNAMES": "localhost"}, False),
        ({"TPU_WORKER_HOSTNAMES": "t1v-0,t1v-1"}, True),
    ],
)
def test_multi_process_launches_are_recognised(env, spans):
    assert spans_processes(env) == spans


def test_a_single_process_run_does_not_start_jax_distributed():
    assert initialize(False, {}) is False and jax.process_count() == 1
