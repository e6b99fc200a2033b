"""read_comfy_dataset against folders written the way ComfyUI's SaveTrainingDataset writes them (torch builds them)."""

import io
import json
import os
import pickle
import subprocess
import sys
import zipfile
from collections import OrderedDict

import ml_dtypes
import numpy as np
import pytest
import torch

from jaxlora.train.comfy_dataset import ComfyDatasetError, UnsafePickleError, read_comfy_dataset

FORMATS = ["torch.save", "torch.save(path)", "pickle.dump"]


def write_shard(path, shard_data, fmt: str) -> None:
    """torch.save(obj, f) is newest ComfyUI, pickle.dump(HIGHEST_PROTOCOL) older ComfyUI; torch.save(obj, path)
    names the archive's root folder after the file instead of `archive`."""
    if fmt == "torch.save(path)":
        torch.save(shard_data, str(path))
        return
    with open(path, "wb") as f:
        if fmt == "torch.save":
            torch.save(shard_data, f)
        else:
            pickle.dump(shard_data, f, protocol=pickle.HIGHEST_PROTOCOL)


def save_training_dataset(folder, latents, conditioning, shard_size: int, fmt: str = "torch.save"):
    """What SaveTrainingDataset.execute does with its (already validated) input lists."""
    folder.mkdir(parents=True, exist_ok=True)
    num_samples = len(latents)
    num_shards = (num_samples + shard_size - 1) // shard_size
    for shard_idx in range(num_shards):
        start, end = shard_idx * shard_size, min((shard_idx + 1) * shard_size, num_samples)
        shard_data = {"latents": latents[start:end], "conditioning": conditioning[start:end]}
        write_shard(folder / f"shard_{shard_idx:04d}.pkl", shard_data, fmt)
    metadata = {"num_samples": num_samples, "num_shards": num_shards, "shard_size": shard_size}
    (folder / "metadata.json").write_text(json.dumps(metadata, indent=2))
    return folder


def make_training_dataset(count: int, seed: int = 0):
    """MakeTrainingDataset-shaped lists: one {"samples": [1, 4, 8, 8]} and one [[cond, dict]] per image, with a
    bf16 latent and an fp16 cond among them."""
    g = torch.Generator().manual_seed(seed)
    latents = [{"samples": torch.randn(1, 4, 8, 8, generator=g)} for _ in range(count)]
    latents[1]["samples"] = latents[1]["samples"].to(torch.bfloat16)
    conditioning = [
        [[torch.randn(1, 77, 32, generator=g), {"pooled_output": torch.randn(1, 1280, generator=g), "width": 1024 + i}]]
        for i in range(count)
    ]
    conditioning[2][0][0] = conditioning[2][0][0].half()
    conditioning[0][0][1]["height"] = 768.0
    return latents, conditioning


def as_float(array: np.ndarray) -> np.ndarray:
    return np.asarray(array).astype(np.float32)


@pytest.mark.parametrize("fmt", FORMATS)
def test_both_shard_formats_read_back_every_number_in_order(tmp_path, fmt):
    latents, conditioning = make_training_dataset(5)
    folder = save_training_dataset(tmp_path / "ds", latents, conditioning, shard_size=3, fmt=fmt)
    assert sorted(p.name for p in folder.glob("shard_*.pkl")) == ["shard_0000.pkl", "shard_0001.pkl"]

    data = read_comfy_dataset(folder)

    assert data.metadata == {"num_samples": 5, "num_shards": 2, "shard_size": 3}
    assert len(data.latents) == len(data.conditioning) == 5
    for i in range(5):
        assert data.latents[i].shape == (4, 8, 8)
        np.testing.assert_array_equal(as_float(data.latents[i]), latents[i]["samples"][0].float().numpy())
        cond, extras = conditioning[i][0]
        np.testing.assert_array_equal(as_float(data.conditioning[i]["c_crossattn"]), cond[0].float().numpy())
        np.testing.assert_array_equal(data.conditioning[i]["pooled_output"], extras["pooled_output"][0].numpy())
        assert data.conditioning[i]["width"] == 1024.0 + i
    assert data.latents[1].dtype == ml_dtypes.bfloat16 and data.latents[0].dtype == np.float32
    assert data.conditioning[2]["c_crossattn"].dtype == np.float16
    assert data.conditioning[0]["height"] == 768.0 and "height" not in data.conditioning[1]
    assert data.ignored_keys == ()


@pytest.mark.parametrize("fmt", FORMATS)
def test_latent_batch_is_split_and_a_single_caption_is_shared(tmp_path, fmt):
    batch = torch.randn(3, 4, 8, 8)
    cond = torch.randn(1, 77, 32)
    extras = {"pooled_output": torch.randn(1, 768), "guidance": 3.5, "attention_mask": torch.ones(1, 77)}
    folder = save_training_dataset(tmp_path / "ds", [{"samples": batch}], [[[cond, extras]]], shard_size=10, fmt=fmt)

    data = read_comfy_dataset(folder)

    assert len(data.latents) == len(data.conditioning) == 3
    for i in range(3):
        np.testing.assert_array_equal(data.latents[i], batch[i].numpy())
        np.testing.assert_array_equal(data.conditioning[i]["c_crossattn"], cond[0].numpy())
        assert data.conditioning[i]["pooled_output"].shape == (768,)
        assert data.conditioning[i]["guidance"] == 3.5
    assert data.ignored_keys == ("attention_mask",)


@pytest.mark.parametrize("fmt", FORMATS)
def test_views_with_offsets_and_strides_are_rebuilt_as_torch_sees_them(tmp_path, fmt):
    base = torch.randn(3, 4, 8, 8)
    latents = [
        {"samples": base[1:2]},  # storage offset
        {"samples": base[0:1].transpose(2, 3)},  # non-contiguous
        {"samples": base[2:3, :, ::2, 1::2]},  # offset and strides > 1
    ]
    cond = torch.randn(1, 32, 77).transpose(1, 2)  # [1, 77, 32], non-contiguous
    conditioning = [[[cond, {}]]] * 3
    assert not latents[1]["samples"].is_contiguous() and not cond.is_contiguous()
    folder = save_training_dataset(tmp_path / "ds", latents, conditioning, shard_size=2, fmt=fmt)

    data = read_comfy_dataset(folder)

    for got, latent in zip(data.latents, latents, strict=True):
        np.testing.assert_array_equal(got, latent["samples"][0].numpy())
        assert got.flags.c_contiguous and got.flags.writeable
    np.testing.assert_array_equal(data.conditioning[0]["c_crossattn"], cond[0].numpy())
    assert set(data.conditioning[0]) == {"c_crossattn"}


class RunsShellCommand:
    """A payload: unpickling it with pickle.load would run the shell command."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class HidesPayloadInStorageBytes:
    """A payload hidden inside the legacy torch.save bytes that older pickled storages carry."""

    def __init__(self, payload):
        self.payload = payload

    def __reduce__(self):
        buffer = io.BytesIO()
        torch.save(self.payload, buffer, _use_new_zipfile_serialization=False)
        return (torch.storage._load_from_bytes, (buffer.getvalue(),))


@pytest.mark.parametrize("fmt", ["pickle.dump", "torch.save", "inside pickled storage bytes"])
def test_a_pickled_command_is_refused_and_never_runs(tmp_path, fmt):
    marker = tmp_path / "pwned"
    payload = RunsShellCommand(f"touch {marker}")
    if fmt == "inside pickled storage bytes":
        payload, fmt = HidesPayloadInStorageBytes(payload), "pickle.dump"
    folder = tmp_path / "ds"
    folder.mkdir()
    write_shard(folder / "shard_0000.pkl", {"latents": [{"samples": payload}], "conditioning": [[]]}, fmt)

    with pytest.raises(UnsafePickleError) as error:
        read_comfy_dataset(folder)

    assert f"{os.system.__module__}.system" in str(error.value)
    assert str(folder / "shard_0000.pkl") in str(error.value)
    assert not marker.exists()


class ClaimsMoreThanItsStorage:
    """A tensor whose size reaches past its 16-byte storage: numpy must never read outside the storage."""

    def __reduce__(self):
        return (
            torch._utils._rebuild_tensor_v2,
            (torch.zeros(4).untyped_storage(), 0, (1, 4, 8, 8), (256, 64, 8, 1), False, OrderedDict()),
        )


def test_a_tensor_reaching_past_its_storage_is_rejected(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    write_shard(
        folder / "shard_0000.pkl",
        {"latents": [{"samples": ClaimsMoreThanItsStorage()}], "conditioning": [[]]},
        "pickle.dump",
    )
    with pytest.raises(ComfyDatasetError, match="reaches past its storage"):
        read_comfy_dataset(folder)


def test_metadata_sample_count_must_match_the_shards(tmp_path):
    latents, conditioning = make_training_dataset(5)
    folder = save_training_dataset(tmp_path / "ds", latents, conditioning, shard_size=3)
    (folder / "shard_0001.pkl").unlink()

    with pytest.raises(ComfyDatasetError, match="num_shards = 2 but the shard files hold 1"):
        read_comfy_dataset(folder)
    (folder / "metadata.json").write_text(json.dumps({"num_samples": 5}))
    with pytest.raises(ComfyDatasetError, match="num_samples = 5 but the shard files hold 3"):
        read_comfy_dataset(folder)


def test_caption_count_neither_one_nor_per_sample_is_an_error(tmp_path):
    latents, conditioning = make_training_dataset(3)
    conditioning[0] = conditioning[0] * 2  # one conditioning list with two captions
    folder = save_training_dataset(tmp_path / "ds", latents, conditioning, shard_size=3)

    with pytest.raises(ComfyDatasetError) as error:
        read_comfy_dataset(folder)
    assert "4 conditioning entries" in str(error.value) and "3 latent samples" in str(error.value)
    assert str(folder) in str(error.value)


def test_missing_folder_and_folder_without_shards(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        read_comfy_dataset(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no shard_"):
        read_comfy_dataset(tmp_path / "empty")


def test_metadata_is_optional_but_must_be_json_when_present(tmp_path):
    latents, conditioning = make_training_dataset(3)
    folder = save_training_dataset(tmp_path / "ds", latents, conditioning, shard_size=2)
    (folder / "metadata.json").unlink()
    assert read_comfy_dataset(folder).metadata == {}
    (folder / "metadata.json").write_text("{not json")
    with pytest.raises(ComfyDatasetError, match="metadata.json is not readable JSON"):
        read_comfy_dataset(folder)


def test_a_shard_that_is_neither_pickle_nor_torch_archive_names_the_file(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "shard_0000.pkl").write_bytes(b"definitely not a pickle")
    with pytest.raises(ComfyDatasetError, match="shard_0000.pkl is not a readable ComfyUI dataset shard"):
        read_comfy_dataset(folder)


def test_reading_never_imports_torch(tmp_path):
    latents, conditioning = make_training_dataset(3)
    folder = save_training_dataset(tmp_path / "ds", latents, conditioning, shard_size=2)
    code = (
        "import sys\n"
        "from jaxlora.train.comfy_dataset import read_comfy_dataset\n"
        f"assert len(read_comfy_dataset({str(folder)!r}).latents) == 3\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def write_raw_shard(folder, data: bytes):
    folder.mkdir()
    (folder / "shard_0000.pkl").write_bytes(data)
    return folder


def test_a_tiny_shard_of_a_billion_shared_references_is_refused_not_walked(tmp_path):
    nested = []
    for _ in range(9):  # ten references to the level below, nine times: 10^9 leaves from a few hundred bytes
        nested = [nested] * 10
    folder = write_raw_shard(tmp_path / "ds", pickle.dumps({"latents": nested, "conditioning": nested}, protocol=4))
    assert (folder / "shard_0000.pkl").stat().st_size < 300
    with pytest.raises(ComfyDatasetError, match="more than 1,000,000 values"):
        read_comfy_dataset(folder)


class RepeatsOneElement:
    """A [2^20, 2^20, 4, 1] tensor with zero strides over a 1-element storage: 16 TiB once copied."""

    def __reduce__(self):
        storage = torch.zeros(1).untyped_storage()
        return (
            torch._utils._rebuild_tensor_v3,
            (storage, 0, (2**20, 2**20, 4, 1), (0, 0, 0, 0), False, OrderedDict(), torch.float32),
        )


@pytest.mark.parametrize("fmt", ["pickle.dump", "torch.save"])
def test_a_zero_stride_tensor_claiming_terabytes_is_refused_before_any_copy(tmp_path, fmt):
    folder = tmp_path / "ds"
    folder.mkdir()
    write_shard(folder / "shard_0000.pkl", {"latents": [{"samples": RepeatsOneElement()}], "conditioning": [[]]}, fmt)
    with pytest.raises(ComfyDatasetError, match=r"repeats elements of its storage \(1 elements\)"):
        read_comfy_dataset(folder)


def test_a_storage_claiming_more_than_its_archive_member_holds_is_refused_before_reading(tmp_path):
    claim = object()

    class ClaimingPickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.FloatStorage, "0", "cpu", 2**40) if obj is claim else None

    class Tensor:
        def __reduce__(self):
            return torch._utils._rebuild_tensor_v2, (claim, 0, (1, 4, 8, 8), (256, 64, 8, 1), False, OrderedDict())

    data = io.BytesIO()
    ClaimingPickler(data, protocol=2).dump({"latents": [{"samples": Tensor()}], "conditioning": [[]]})
    folder = tmp_path / "ds"
    folder.mkdir()
    with zipfile.ZipFile(folder / "shard_0000.pkl", "w") as archive:
        archive.writestr("archive/data.pkl", data.getvalue())
        archive.writestr("archive/data/0", bytes(16))
    with pytest.raises(ComfyDatasetError, match="storage 0 claims 1099511627776 elements"):
        read_comfy_dataset(folder)


def test_a_pickle_asking_for_a_huge_memo_is_refused(tmp_path):
    # PROTO 4, EMPTY_DICT, LONG_BINPUT 2^31 (the unpickler would size its memo to that), STOP
    folder = write_raw_shard(tmp_path / "ds", b"\x80\x04}r" + (2**31).to_bytes(4, "little") + b".")
    with pytest.raises(ComfyDatasetError, match="memo index 2147483648"):
        read_comfy_dataset(folder)
