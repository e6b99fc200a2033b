"""Before/after of the convolution input gradient in one run: jaxlora's training step of
`benchmarks/vs_torch.py` compiled twice, once with `Conv2d` as it is (stride-1 input gradient as a matmul and
col2im, `layers._conv_same_stride`) and once with autodiff's rule (a convolution with the reversed kernel),
timed alternately.

Run from the repository root as `python benchmarks/conv_input_grad.py`; prints markdown for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import jax
import numpy as np
from vs_torch import jax_side, one_case_arguments, sd15_shaped, train_config

from jaxlora.models import layers
from jaxlora.models.demo import write_random_checkpoint
from jaxlora.train.perf import measure_matmul_peak, step_flops


@contextmanager
def autodiff_conv_gradient():
    """Trace `Conv2d` with autodiff's input gradient (the code before the change)."""
    current = layers.Conv2d.apply_kernel
    layers.Conv2d.apply_kernel = lambda self, x, kernel: layers._conv(x, kernel, self.stride, self.padding)
    try:
        yield
    finally:
        layers.Conv2d.apply_kernel = current


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    one_case_arguments(parser)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    unet_config = sd15_shaped(args.width)
    config = train_config(args, args.dtype, args.remat == "on")
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = write_random_checkpoint(unet_config, Path(folder) / "model.safetensors")
        with autodiff_conv_gradient():
            before = jax_side(args, config, checkpoint, unet_config)
        after = jax_side(args, config, checkpoint, unet_config)
    runs = {"before (autodiff)": before, "after (matmul + col2im)": after}
    seconds, losses = {name: [] for name in runs}, {name: [] for name in runs}
    for i in range(2 + args.steps):
        for name in list(runs)[:: 1 if i % 2 else -1]:
            begin = time.perf_counter()
            losses[name].append(float(runs[name].step(i)))
            seconds[name].append(time.perf_counter() - begin)
    np.testing.assert_allclose(*losses.values(), rtol=1e-4)  # the same training, step by step
    peak = measure_matmul_peak(2048)
    print(
        f"jax {jax.__version__}; SD1.5 structure at width {args.width}, batch {args.batch}, "
        f"{args.latent}x{args.latent} latents, rank {args.rank}, {args.dtype}, remat {args.remat}; "
        f"median of {args.steps} alternated steps; "
        f"matmul peak {peak / 1e9:.1f} GFLOP/s\n"
    )
    print("| input gradient | s/step | GFLOP/step (XLA) | GFLOP/s | of matmul peak | compile s |")
    print("|---|---|---|---|---|---|")
    for name, run in runs.items():
        median = statistics.median(seconds[name][2:])
        flops = step_flops(run.compiled)
        print(
            f"| {name} | {median:.3f} | {flops / 1e9:.2f} | {flops / median / 1e9:.1f} | {flops / median / peak:.1%} "
            f"| {run.compile_seconds:.0f} |"
        )
    ratio = statistics.median(seconds["before (autodiff)"][2:]) / statistics.median(
        seconds["after (matmul + col2im)"][2:]
    )
    print(f"\nbefore / after: {ratio:.2f}x; losses equal within 1e-4 relative over {2 + args.steps} steps")


if __name__ == "__main__":
    main()
