"""The model check, `python -m jaxlora.inspect`, end to end."""

import subprocess
import sys

from jaxlora.inspect import main


def test_demo_runs_end_to_end_and_says_it_is_a_demo():
    result = subprocess.run(
        [sys.executable, "-m", "jaxlora.inspect"], capture_output=True, text=True, timeout=600, check=True
    )
    assert "built-in demo" in result.stdout
    assert "sd1 (Stable Diffusion 1.x)" in result.stdout
    assert "1,028,484" in result.stdout  # the demo family's demo config
    assert "finite" in result.stdout and "NOT FINITE" not in result.stdout


def test_checkpoint_is_described(tiny_checkpoint, capsys):
    main([str(tiny_checkpoint("sdxl")), "--no-forward", "--prediction", "v"])
    out = capsys.readouterr().out
    assert "sdxl (Stable Diffusion XL)" in out
    assert "y 2816-d" in out
    assert "prediction    v" in out


def test_flux_checkpoint_is_described(tmp_path, capsys):
    from jaxlora.models.demo import write_random_checkpoint
    from jaxlora.models.flux_family import TINY_FLUX_DEV

    main([str(write_random_checkpoint(TINY_FLUX_DEV, tmp_path / "flux.safetensors")), "--no-forward"])
    out = capsys.readouterr().out
    assert "flux-dev (Flux.1 dev)" in out
    assert "2 double, 2 single" in out and "2 heads of 128" in out
    assert "prediction    const" in out
