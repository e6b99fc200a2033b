"""Where jaxlora's training step spends its time: a jax.profiler trace of the compiled step of
`benchmarks/vs_torch.py` (same model, same settings), with every XLA thunk's time summed by HLO instruction
and grouped by the kind of work (convolution, dot, fused elementwise, copy/transpose, ...).

Run from the repository root as `python benchmarks/profile_step.py [--dtype fp32] [--remat off]`; prints
markdown: the time per kind and the top instructions with their share of the step.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import math
import re
import tempfile
from pathlib import Path

import jax
from jax.profiler import ProfileData
from vs_torch import TOKENS, diffusers_config, jax_side, one_case_arguments, sd15_shaped, train_config

from jaxlora.models.demo import write_random_checkpoint
from jaxlora.train.perf import step_flops

# an HLO instruction line: "%name = type[shape]{layout} opcode(...), ..., calls=%comp" (the root has "ROOT ")
INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\S+?)\s+([\w\-]+)\(")


def instruction_kinds(hlo: str) -> dict[str, str]:
    """HLO instruction name -> its kind: the opcode, or for a fusion the heaviest opcode it calls."""
    computations, current, kinds = {}, None, {}
    for line in hlo.splitlines():
        if line and not line.startswith(" ") and "{" in line:
            current = line.split()[0 if not line.startswith("ENTRY") else 1].lstrip("%")
            computations[current] = []
        match = INSTRUCTION.match(line)
        if match and current is not None:
            name, shape, opcode = match.groups()
            computations[current].append(opcode)
            called = re.search(r"calls=%?([\w.\-]+)", line)
            kinds[name] = (opcode, called.group(1) if called else None, shape)
    order = ("convolution", "dot", "reduce-window", "scatter", "gather", "reduce", "transpose", "copy")

    def kind(name: str) -> str:
        opcode, called, shape = kinds[name]
        if opcode == "fusion" and called in computations:
            inner = computations[called]
            opcode = f"fusion({next((op for op in order if op in inner), 'elementwise')})"
        dims = re.search(r"\[([\d,]*)\]", shape)
        elements = math.prod(int(d) for d in dims.group(1).split(",") if d) if dims else 0
        return opcode + (", < 16K elements" if elements < 2**14 else "")

    return {name: kind(name) for name in kinds}


def thunk_times(trace_dir: str) -> collections.Counter:
    """Seconds per event name on the XLA:CPU executor threads, summed over the trace."""
    path = sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True))[-1]
    times, counts = collections.Counter(), collections.Counter()
    for plane in ProfileData.from_file(path).planes:
        for line in plane.lines:
            if line.name == "python":
                continue
            for event in line.events:
                if not event.name.startswith(("ThreadpoolListener", "end: ", "ThunkExecutor")):
                    times[event.name] += event.duration_ns / 1e9
                    counts[event.name] += 1
    return times, counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    one_case_arguments(parser)
    parser.add_argument("--steps", type=int, default=3, help="profiled steps")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--hlo", type=Path, help="also write the optimized HLO here")
    parser.add_argument("--json", type=Path, help="also write the seconds per instruction here")
    args = parser.parse_args()
    unet_config = sd15_shaped(args.width)
    config = train_config(args, args.dtype, args.remat == "on")
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = write_random_checkpoint(unet_config, Path(folder) / "model.safetensors")
        (Path(folder) / "config.json").write_text(json.dumps(diffusers_config(unet_config)))
        run = jax_side(args, config, checkpoint, unet_config)
        for i in range(2):
            run.step(i)
        trace = str(Path(folder) / "trace")
        jax.profiler.start_trace(trace)
        for i in range(2, 2 + args.steps):
            run.step(i)
        jax.profiler.stop_trace()
        times, counts = thunk_times(trace)
    hlo = run.compiled.as_text()
    if args.hlo:
        args.hlo.write_text(hlo)
    if args.json:
        args.json.write_text(json.dumps(dict(times.most_common()), indent=0))
    kinds = instruction_kinds(hlo)
    total = sum(times.values())
    by_kind, kind_counts = collections.Counter(), collections.Counter()
    for name, seconds in times.items():
        by_kind[kinds.get(name, "other")] += seconds
        kind_counts[kinds.get(name, "other")] += counts[name]
    print(
        f"jaxlora step, SD1.5 structure at width {args.width}, batch {args.batch}, {args.latent}x{args.latent} "
        f"latents, "
        f"{TOKENS} tokens, rank {args.rank}, {args.dtype}, remat {args.remat}: {step_flops(run.compiled) / 1e9:.2f} "
        f"GFLOP/step; {total / args.steps:.3f} s/step of thunk time (summed over threads), {args.steps} steps\n"
    )
    print("| kind | thunks/step | s/step | share |\n|---|---|---|---|")
    for kind, seconds in by_kind.most_common():
        print(f"| {kind} | {kind_counts[kind] // args.steps} | {seconds / args.steps:.4f} | {seconds / total:.1%} |")
    print("\n| top instructions | kind | s/step | share |\n|---|---|---|---|")
    for name, seconds in times.most_common(args.top):
        print(f"| {name} | {kinds.get(name, 'other')} | {seconds / args.steps:.4f} | {seconds / total:.1%} |")


if __name__ == "__main__":
    main()
