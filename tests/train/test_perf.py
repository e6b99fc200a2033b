"""Throughput accounting: FLOP counts (XLA's of a compiled program, and the jaxpr count that counts every
scanned layer), the peak table, and the trainer's report of steps/s, samples/s and MFU."""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import pytest

from jaxlora import load_model
from jaxlora.models.attention import batch_split_over, splash_attention, xla_attention
from jaxlora.models.demo import demo_dataset, write_random_checkpoint
from jaxlora.parallel.mesh import batch_sharding, make_mesh
from jaxlora.train.loop import train_lora
from jaxlora.train.perf import device_peak, matmul_flops, published_peak, step_flops
from tests.train.test_train import FP32, ONE_LEVEL


def test_step_flops_is_xlas_count_of_a_matmul():
    m, k, n = 64, 32, 16
    compiled = jax.jit(jnp.matmul).lower(jnp.ones((m, k)), jnp.ones((k, n))).compile()
    assert step_flops(compiled) == 2 * m * k * n


@pytest.mark.parametrize(
    ("kind", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA L4", 121e12),
        ("TPU v5 lite", 197e12),
        ("TPU v5", 459e12),
        ("TPU v4", 275e12),
        ("cpu", None),
        ("Some Future Chip", None),
    ],
)
def test_published_peak_by_device_kind(kind, peak):
    assert published_peak(SimpleNamespace(device_kind=kind)) == peak


def test_cpu_peak_is_measured_once():
    peak, source = device_peak()
    assert peak > 1e8 and "measured" in source
    assert device_peak() == (peak, source)  # cached: the trainer pays for the matmul once per process


def test_trainer_reports_steps_samples_and_mfu(tmp_path):
    model = load_model(write_random_checkpoint(ONE_LEVEL, tmp_path / "unet.safetensors"), dtype="fp32")
    lines = []
    result = train_lora(
        model, *demo_dataset(4, 8), steps=3, batch_size=2, rank=2, gradient_checkpointing=False, **FP32,
        progress=lines.append, log_every_seconds=0,
    )  # fmt: skip
    stats = result.stats
    assert stats.flops > 0 and stats.flops % 3 == 0  # three steps of one compiled shape
    assert 0 < stats.mfu(stats.train_seconds) < 1
    step_lines = [line for line in lines if line.startswith("step ")]
    assert len(step_lines) == 3
    assert all("steps/s" in line and "samples/s" in line and "MFU" in line for line in step_lines)


def test_matmul_flops_counts_every_scanned_layer_as_the_unrolled_compile_does():
    """XLA's cost analysis counts a scan body once; the jaxpr count multiplies it by the trip count. Per layer of
    tanh(c @ w) differentiated for w: the forward product, the weight gradient and the carry gradient."""
    m, k, layers = 64, 256, 8

    def loss(w, x, unroll):
        return jax.lax.scan(lambda c, wi: (jnp.tanh(c @ wi), None), x, w, unroll=unroll)[0].sum()

    w, x = jnp.ones((layers, k, k)), jnp.ones((m, k))
    scanned = jax.jit(jax.grad(lambda w, x: loss(w, x, 1))).trace(w, x)
    unrolled = jax.jit(jax.grad(lambda w, x: loss(w, x, True))).trace(w, x)
    assert matmul_flops(scanned.jaxpr) == matmul_flops(unrolled.jaxpr) == layers * 3 * 2 * m * k * k
    assert step_flops(scanned.lower().compile()) < 2 * 3 * 2 * m * k * k  # XLA: one layer's worth
    # XLA on the unrolled program: the same products, less the first layer's carry gradient (dead code to XLA),
    # plus elementwise work it also counts: within 5%.
    assert step_flops(unrolled.lower().compile()) == pytest.approx(matmul_flops(unrolled.jaxpr), rel=0.05)


def test_matmul_flops_of_a_grouped_convolution_and_its_two_gradients():
    kernel, image = jnp.ones((8, 2, 3, 3)), jnp.ones((2, 4, 16, 16))  # 2 groups of 2 -> 4 features per group

    def loss(k, x):
        return jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", feature_group_count=2).sum()

    traced = jax.jit(jax.grad(loss, argnums=(0, 1))).trace(kernel, image)
    outputs, per_output = 2 * 8 * 16 * 16, 2 * 3 * 3
    assert matmul_flops(traced.jaxpr) == 3 * 2 * outputs * per_output


def test_trainer_counts_scanned_blocks_as_unrolled_ones(tmp_path):
    """The Flux-line step: the trainer's count is the same with the blocks scanned or unrolled (tracing only)."""
    from jaxlora.models.flux_family import TINY_FLUX_DEV
    from jaxlora.train.config import TrainConfig
    from jaxlora.train.data import make_dataset
    from jaxlora.train.loop import prepare_run
    from jaxlora.train.step import compile_step, noise_key_data, permutation_key
    from tests.train.test_flux_train import flux_data

    model = load_model(write_random_checkpoint(TINY_FLUX_DEV, tmp_path / "flux.safetensors"), dtype="fp32")
    config = TrainConfig(steps=1, rank=2, training_dtype="fp32", lora_dtype="fp32")
    counts = []
    for scan in (True, False):
        model.network.scan = scan
        run = prepare_run(model, make_dataset(*flux_data()), config)
        inputs = (run.adapters, run.opt_state, run.base, run.data[0], noise_key_data(0, 0, 1), permutation_key(0), 0)
        counts.append(matmul_flops(compile_step(run.graph, run.settings, run.layout).trace(*inputs).jaxpr))
    assert counts[0] == counts[1] > 0


def test_matmul_flops_counts_the_attention_kernel_per_grid_point_and_device():
    """Splash attention's forward is the same two products as XLA's (4 B H L S D FLOPs); on a mesh its shard_map
    body, one device's samples, counts once per device. Its fused backward also recomputes the scores: five
    products against XLA's four (with the forward 3.5 forwards against 3), counted as executed."""
    batch, length, heads, width = 8, 256, 2, 64
    q = jnp.ones((batch, length, heads, width))
    forward = 4 * batch * heads * length * length * width
    assert matmul_flops(jax.make_jaxpr(xla_attention)(q, q, q)) == forward
    assert matmul_flops(jax.make_jaxpr(lambda x: splash_attention(x, x, x, interpret=True))(q)) == forward

    def on_mesh(x):
        with batch_split_over(batch_sharding(make_mesh("data=2,fsdp=4"))):
            return splash_attention(x, x, x, interpret=True)

    assert matmul_flops(jax.make_jaxpr(on_mesh)(q)) == forward
    grads = lambda f: jax.make_jaxpr(jax.grad(lambda x, y: f(x, y, y).sum(), argnums=(0, 1)))(q, q)  # noqa: E731
    assert matmul_flops(grads(xla_attention)) == 3 * forward
    kernel_grads = matmul_flops(grads(lambda *x: splash_attention(*x, interpret=True)))
    assert 3.5 * forward <= kernel_grads < 3.51 * forward  # and a few small products of the kernel's bookkeeping
