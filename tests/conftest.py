import pytest

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
