import os

# Tests compile many small programs and run each briefly: LLVM's optimisation passes would cost more than they
# save. This changes code generation only, not the numerics (no fast-math).
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
# Eight simulated CPU devices for the mesh tests (tests/parallel). Everything else runs on the first device as
# before: unsharded programs are placed on one device, and the others stay idle.
os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"

# The test extra installs XLA's TPU compiler (libtpu) to compile for TPU chips from this host; the tests themselves
# run on the CPU, and a TPU runtime is never looked for.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# libtpu takes a machine-wide lock file when it loads; another process that loaded it (a training run, a benchmark)
# would make the TPU-compile tests fail. Only the compiler is used here, so sharing is safe.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax
import pytest
from jax.experimental.compilation_cache import compilation_cache
from safetensors.numpy import load_file

from jaxlora import load_model
from jaxlora.models.demo import write_random_checkpoint
from tests.models.tiny_unets import FAMILIES


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Path of a random tiny checkpoint (full-checkpoint prefix) of a family; written once per session."""
    written = {}

    def make(family: str):
        if family not in written:
            folder = tmp_path_factory.mktemp(family)
            written[family] = write_random_checkpoint(FAMILIES[family].config, folder / "model.safetensors", seed=1)
        return written[family]

    return make


@pytest.fixture
def tiny_model(tiny_checkpoint):
    """A freshly loaded fp32 tiny model of a family, with its base state dict in torch layout."""

    def make(family: str):
        path = tiny_checkpoint(family)
        base = {k[len("model.") :]: v for k, v in load_file(str(path)).items()}
        return load_model(path, dtype="fp32"), base

    return make


@pytest.fixture(scope="session", autouse=True)
def session_compile_cache(tmp_path_factory):
    """One persistent compilation cache for the whole session, in-process and in the CLI and notebook runs the
    tests start (JAX's own variables, and $JAXLORA_CACHE_DIR for CLI runs that enable theirs): most tests train
    the same tiny steps, and on a CPU compiling them is most of a test's time, so each program compiles once.
    Programs that compile faster than reading them back would pay are not written. The previous settings come
    back afterwards."""
    folder = tmp_path_factory.mktemp("xla_cache")
    settings = {"jax_compilation_cache_dir": str(folder), "jax_persistent_cache_min_compile_time_secs": 0.1}
    previous = {name: getattr(jax.config, name) for name in settings}
    for name, value in settings.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()
    with pytest.MonkeyPatch.context() as environment:
        for name, value in settings.items():
            environment.setenv(name.upper(), str(value))
        environment.setenv("JAXLORA_CACHE_DIR", str(folder))
        yield folder
    for name, value in previous.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()
