"""Throughput accounting: XLA's FLOP count of a compiled program, the peak table, and the trainer's report of
steps/s, samples/s and MFU."""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import pytest

from jaxlora import load_model
from jaxlora.models.demo import demo_dataset, write_random_checkpoint
from jaxlora.train.loop import train_lora
from jaxlora.train.perf import device_peak, published_peak, step_flops
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
