"""What a short seeded training writes, pinned by hash: the exported tensors of every family and algorithm, in
every key style that can name them. A refactor must leave these bytes unchanged; a deliberate change of what is
trained or written updates the pinned digest in the same commit, with the reason in its message.

The digest covers key names, dtypes, shapes and raw bytes of the tensors (not the metadata, whose software
version and settings may change without changing the adapter)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from jaxlora import load_model
from jaxlora.adapters.formats import AdapterFileError, export_adapter
from jaxlora.models.chroma_family import TINY_CHROMA
from jaxlora.models.demo import demo_dataset, write_random_checkpoint
from jaxlora.models.family import STYLES
from jaxlora.models.flux2_family import TINY_FLUX2_KLEIN
from jaxlora.models.flux_family import TINY_FLUX_DEV, TINY_FLUX_SCHNELL
from jaxlora.models.nextdit_family import TINY_LUMINA2, TINY_Z_IMAGE
from jaxlora.models.qwen_image_family import TINY_QWEN_IMAGE
from jaxlora.models.unet_family import DEMO_UNET
from jaxlora.models.wan_family import TINY_WAN21
from jaxlora.train.config import TrainConfig
from jaxlora.train.data import make_dataset
from jaxlora.train.loop import run_training
from tests.models.tiny_unets import SD2, SDXL
from tests.train.test_chroma_train import chroma_data
from tests.train.test_flux2_train import flux2_data
from tests.train.test_flux_train import flux_data
from tests.train.test_nextdit_train import nextdit_data
from tests.train.test_qwen_image_train import qwen_image_data
from tests.train.test_wan_train import video_data

ALGORITHMS = ("LoRA", "LoHa", "LoKr", "OFT")
CONFIGS = {
    "sd1": DEMO_UNET,
    "sd2": SD2.config,
    "sdxl": SDXL.config,
    "flux-dev": TINY_FLUX_DEV,
    "flux-schnell": TINY_FLUX_SCHNELL,
    "chroma": TINY_CHROMA,
    "flux2-klein": TINY_FLUX2_KLEIN,
}
# (family, algorithm) -> {style: sha256 of the exported tensors}
PINNED = {
    ("sd1", "LoRA"): {
        "comfyui": "073474a92dc9b0f162e15483c611c8a24cf731caa7859fdd10920d1047bb3d71",
        "kohya": "f11edf3473fe33effb33cfa2f40fb93ce98b2a86cb948621f5c7e81d2b7068f3",
        "peft": "8564426f6882f1e058bff7e9857d1909d3104ad693fc76ceac8051b2539e6b54",
    },
    ("sd1", "LoHa"): {
        "comfyui": "7aade63caa771b6ecc4e5acccab9599a09b0b82963a82f169bc4720173c6ff9b",
        "kohya": "352e820b233f6d0226e439ee2dc3a40ed0009c69d24298cbb4ed7aadd627100e",
        "peft": "refused",
    },
    ("sd1", "LoKr"): {
        "comfyui": "2f08f63ed1f9451032cc53d1eea67c7ca766f4875026031103779fd8fbd504c6",
        "kohya": "15960e15526538c4d30ad092fd3d7bb3ad05c45f6fb254b01d426cf454e41533",
        "peft": "refused",
    },
    ("sd1", "OFT"): {
        "comfyui": "66df1ce443d01cdf7faa005b6f12962fee2ba46b8f646fa453ee233745fe6c1c",
        "kohya": "f579134ba0bbf6dee682b9a27edadc1e7d047c86b41bb83c85919ea903c236c8",
        "peft": "refused",
    },
    ("sd2", "LoRA"): {
        "comfyui": "5fc824d2e5fde84268d64ca5264654c4687fe24d84789aec7c097caec32ea726",
        "kohya": "286b36a490f68b1fa7da99b4d2e4591fde5a2c3d8e6b0bbb782c46c39136143f",
        "peft": "03513e6aa8b7b609c68d2758a0f5f11c48b125663fa61de193823f1691d6d54d",
    },
    ("sd2", "LoHa"): {
        "comfyui": "246846b8125bcdbb6f3fd5377232ca7baf37166f693ec838abd1edfcfc935b42",
        "kohya": "e3f003941e8bd688d03e9db4859dece3fb4a0d5efe6eea80a485e822c67924c4",
        "peft": "refused",
    },
    ("sd2", "LoKr"): {
        "comfyui": "f1e859cbf0c44c82383831c1aff407697ed833e8773d65cf122df8cbf5e52a58",
        "kohya": "f8220c05ab38c0afa78e68cc6c98789ee8e4e5096e276c8b219a5abb2e4357e6",
        "peft": "refused",
    },
    ("sd2", "OFT"): {
        "comfyui": "69aa0065a8cddd18531183c01ec9fb61e5818e0d7cc5e3037efa0bfda06bd4f0",
        "kohya": "30d660e8063dde876a80b6ee7f643e8067d1d0790b6bca97622c00960430c837",
        "peft": "refused",
    },
    # SDXL's depth-2 transformer blocks are stacked: `write_random_checkpoint` draws the random weights in
    # `layer_sites` order (block 0 and 1 of one layer, then the next layer), so the test checkpoint, and with it
    # every trained tensor, differs from the unstacked network's. On one same file the stacked and unstacked
    # forwards agree to 1.1e-6 relative (L2).
    ("sdxl", "LoRA"): {
        "comfyui": "5586055214548831c5c8db7ef56635cdec4e5ae4a8b2e6cdf3b73fcbdc357e35",
        "kohya": "5456f81f69d0f5f44229e7683115075aea9a4e544dbed70df7cafd4ff57ccdfe",
        "peft": "e143004af2e8023ae3ccdc7128f52288ae294e999fe90691d8e914df64f1bc21",
    },
    ("sdxl", "LoHa"): {
        "comfyui": "f1408755a19d1b01c6fe60f8b507ba243dac21f72e9db061802d44e0e72e5b07",
        "kohya": "5eceb8548696ee2a4b8789f65b34d71192fbc64417bfe97f268c340286ad37b3",
        "peft": "refused",
    },
    ("sdxl", "LoKr"): {
        "comfyui": "707aace124138e7e81aa85af795fda0f303ff88d2cbec793408a31b687a7a011",
        "kohya": "7fcc144e306bec211c1c2c739711e2d82d6f99fbee2bb32eeabcf80430f60f14",
        "peft": "refused",
    },
    ("sdxl", "OFT"): {
        "comfyui": "60d2d206c48d79ca1ddeb18b2243fb490205ac3c092b4fe5d2db99f3469e4317",
        "kohya": "0da9d21c7a9c05edf9a8efbf6c15cf3c2bf609e32077a2851a0c62d46ae03379",
        "peft": "refused",
    },
    ("flux-dev", "LoRA"): {
        "comfyui": "3e073423b395b1cbe92b2bb5ca50fad9b5563e5ada62d719407348deb1c90029",
        "kohya": "ccbec57c695c00792361aaa2e0567ae9983ea9e52d80ae0d6068fafa487d7293",
        "peft": "2b28e6bc2fd5ae2154f1d4127a618f59457871003dafad4b35d145cefa4d6406",
    },
    ("flux-dev", "LoHa"): {
        "comfyui": "6701bf3d0abd15e3121c6db90621d053e8de722b593424196bdbdb37f5697d06",
        "kohya": "85c97bbe6fc9c8c6af18c76dca8d7658ddd3833b90e98cb2f15cf319fdceb7e8",
        "peft": "refused",
    },
    ("flux-dev", "LoKr"): {
        "comfyui": "de99c4d22cef93fd1a62eea8382bd136a60be322623fcea5075c5fcb336b4fd8",
        "kohya": "189f8333b26f2e89dac54c73f61c6dc4951447cf2695de5e4cdc986a130b69f7",
        "peft": "refused",
    },
    ("flux-dev", "OFT"): {
        "comfyui": "f9533e03fa9755c57d96421054c8505a3bff6d3083d7c1802196b5c979803660",
        "kohya": "db8a0b407bf1d41ae16ae6ff88c0eed028110f812c1a1df4f3a909ac98bc2b1f",
        "peft": "refused",
    },
    ("flux-schnell", "LoRA"): {
        "comfyui": "40db1ccf566645379416dae90d1be25dae53113644c2d97a411cb7136d827862",
        "kohya": "089ae6cc8524a6bf145f008f4258b3feb43313a0ab206d71deafc77f3d3048e6",
        "peft": "d4707d048b833060732d62e6823e02d412db04e72ea31d7dbc95f732f6527c40",
    },
    ("flux-schnell", "LoHa"): {
        "comfyui": "db790a8294157e975039028ee46a71b811780060e02dea9790f1339b2afabb13",
        "kohya": "a866f3ff66b5776280e3fe58956908c3765fb4fe1f8b5eba13c4031f0845541f",
        "peft": "refused",
    },
    ("flux-schnell", "LoKr"): {
        "comfyui": "c098ebd98162fcba5da6603be4009ded82388e2548bd108dc2c94f42effbcb18",
        "kohya": "c79bd11fdda3f4fd66a284a9825022bdc05af561cd6a1877348d5ab7530e0e5e",
        "peft": "refused",
    },
    ("flux-schnell", "OFT"): {
        "comfyui": "9fe6446c9f4f2a947050c1df384c2a992ab395678b9acf85068f30be8335c464",
        "kohya": "562f7eec7c7be385ba657c4415650c67d22dc25e83f71cb1ff1ff8a926fba27b",
        "peft": "refused",
    },
    ("chroma", "LoRA"): {
        "comfyui": "3b38b4dc7387d9005ed8bd2f9fe550c3f2f0c3f0c9e0e10c1525430a8013b5fa",
        "kohya": "f7ae52f0ad2bd1c0588f91e456e0e7f33c5311db05bc979139bf21a30dea45a6",
        "peft": "refused",
    },
    ("chroma", "LoHa"): {
        "comfyui": "b370f01ba98c5de3cfe9376c4c11e5d877c0f1d55c2059ed8b6fc89b4b30d44e",
        "kohya": "9f20c85bb4c2e6510c458ce140b7c879315b9e0a04c3e325d69548db60b663f3",
        "peft": "refused",
    },
    ("chroma", "LoKr"): {
        "comfyui": "75a1ef09d9ce05600a8507252eb1198e29519a794cab9430a9b15c9c0a0428cc",
        "kohya": "03462370fb069e107d3d98f92794666e4fb622b1b8fcb6e37c7e402b24cdcce9",
        "peft": "refused",
    },
    ("chroma", "OFT"): {
        "comfyui": "629f95f129afa5d75adfa8c0b3e08e4f3e49da6f09065af8fa6e0b87e29ea531",
        "kohya": "01c8f2028fdcf997833a8b9b24c4ddbde799a836f85db59d5227f029893c6a0c",
        "peft": "refused",
    },
    # Flux.2 klein: `peft` refused, the shared modulations and time embedder have no diffusers name ComfyUI maps.
    ("flux2-klein", "LoRA"): {
        "comfyui": "5f28b175ebfe9adf6c410db1fb6812bec67598122f700a2377d5c4d2d1bd5723",
        "kohya": "0ce06915840c6e4c010a298a3eeb71b031531157dd5104c5f5c630c98bc2264d",
        "peft": "refused",
    },
    ("flux2-klein", "LoHa"): {
        "comfyui": "6ee84428a394c68d5a4a65b19a87b8342d9842717f20fe324314443d7137a9dd",
        "kohya": "7e668d2878793e09675711d8699b876ff5af3932cd635e46ff7714ee43d15d3d",
        "peft": "refused",
    },
    ("flux2-klein", "LoKr"): {
        "comfyui": "b882047ac47650f139cd9cafbea28756ac954b6a27d1709be84b6afafaddb5c9",
        "kohya": "01edb4326a99fadaf10ab84c2908be30bfc6e6f727ef580135b3fc93e750f974",
        "peft": "refused",
    },
    ("flux2-klein", "OFT"): {
        "comfyui": "3cd171db974f4317b712e0ba9f2593922d7730086b566379719635876916f9a8",
        "kohya": "d686ff7d4dcfaba664e1c314f4df8cf852226f6abe33865de1020ed2d19ef7c3",
        "peft": "refused",
    },
}
# In CI: every algorithm on the cheapest UNet and LoRA on SDXL and Flux dev; the rest with `pytest -m slow`
# (each family's LoRA training test runs in CI, so its code paths are exercised there; the bytes are pinned here).
IN_CI = {*(("sd1", a) for a in ALGORITHMS), ("sdxl", "LoRA"), ("flux-dev", "LoRA")}

# NextDiT (Z-Image, Lumina 2).
CONFIGS |= {"z-image": TINY_Z_IMAGE, "lumina2": TINY_LUMINA2}
NEXTDIT_PINNED = {
    ("z-image", "LoRA"): {
        "comfyui": "005e251d2f19ce87204315094b17823d650f8fbae997837c824dde04ed2bb0d7",
        "kohya": "e56bbf1b718db8c09d6dad7c44a69463a6790d398028628a0645571d72518daa",
        "peft": "e1240fa6c35d341711d098d63a8436047ed3dec729ca2adf17552daa2fa6831b",
    },
    ("z-image", "LoHa"): {
        "comfyui": "2a8737afa9c0698db96c45aa7035d5b3b1865ade165d101278e508a5912a4c2c",
        "kohya": "7a55af6ae21a60316372e3b9267c27bd8a770ce250627e0344a2a2fedf230d13",
        "peft": "refused",
    },
    ("z-image", "LoKr"): {
        "comfyui": "acd866f5e22dc385906171b0036df1207b7cd70f2954afccf563dee8fe5db97c",
        "kohya": "924cc05072b73c72918de1ed852676e4d87c85e274fa5593f4483889245de068",
        "peft": "refused",
    },
    ("z-image", "OFT"): {
        "comfyui": "89c290e5ddc3ca42a021a7acd19ab91fa061e0052c8a06ecd5bd0a1fa6c73da2",
        "kohya": "0bd32b21e2fb3c88b23668dc450942ab436733c43921ac7812eec5c05f3b46ac",
        "peft": "refused",
    },
    ("lumina2", "LoRA"): {
        "comfyui": "3d6136925140dadd700028d70b930c77fe33f95e59aa4fe31e2f2f3891ddc3b3",
        "kohya": "e3506d641ac3e76092425b2944b5d87c4e56df86f3264f91d5fbebf3a9f830d5",
        "peft": "refused",
    },
    ("lumina2", "LoHa"): {
        "comfyui": "88a70a59e54326261b58fb452a3ab7edee66767c792227bb8b4fbc132fdfafb5",
        "kohya": "951d5444f4b526626fa2d4547734dfeec33fe475721ad9b2ab9819089fb5c5dd",
        "peft": "refused",
    },
    ("lumina2", "LoKr"): {
        "comfyui": "ba066c88438e892db9b1641b4214c4f1b321094d33ba8fa434008f3656f5bceb",
        "kohya": "24de0a8bf675222980085294298c14c53653af7a8879e321882e356ceab912f6",
        "peft": "refused",
    },
    ("lumina2", "OFT"): {
        "comfyui": "aed6a1768c6c18f70bae0f57ee0b8ae0760ee68daf4bad5c42e3da66f8ea15fd",
        "kohya": "4bf8d2b18fc55e27f2697d67f841bea6360eddda45e0983957d260ed3dfea46c",
        "peft": "refused",
    },
}
PINNED |= NEXTDIT_PINNED

# Qwen-Image: `peft` names every layer (LoRA only).
CONFIGS |= {"qwen-image": TINY_QWEN_IMAGE}
QWEN_IMAGE_PINNED = {
    ("qwen-image", "LoRA"): {
        "comfyui": "cda3c12f0c1c1efc76cf1fe46aa700b78fe509169b9db706bf66dff4a2be142c",
        "kohya": "951705f10b700cd2ebf87e44b4a4f6724abbbee9a4387436cfcabaa451024918",
        "peft": "3116a21ee67a15afe0c3dab98948ad267ae0fb699d08196a3b1bef82e1175a21",
    },
    ("qwen-image", "LoHa"): {
        "comfyui": "cc0e7661d271cbf3dbc05d39f323792d94c6a30550ea2b4ba973bb8b2aaab742",
        "kohya": "85433349067eb4a9aa66d67745b5258cf613e4f0d2e4ab040d1df51f0955e86b",
        "peft": "refused",
    },
    ("qwen-image", "LoKr"): {
        "comfyui": "1c22c5f749d7ecde1497ffb821a04248644f5d915119c84ca14ba1610e5259c4",
        "kohya": "9b2fcef97a697e1c2f73dbd0e3c6e285a28528640503b4d78f9e5a53256eeeb1",
        "peft": "refused",
    },
    ("qwen-image", "OFT"): {
        "comfyui": "48e366e7a7a68319672c6fa06ed9a33152372d88e65a9df99837b6ae4be9e0c9",
        "kohya": "4280e7b93e2540efe44a2d71a71d4295f03e8628116ca574be450d6e9e70d4e0",
        "peft": "refused",
    },
}
PINNED |= QWEN_IMAGE_PINNED

# Wan 2.1 on 2-frame video latents. `peft` is refused: ComfyUI maps no diffusers names for Wan.
CONFIGS |= {"wan2.1": TINY_WAN21}
WAN_PINNED = {
    ("wan2.1", "LoRA"): {
        "comfyui": "ae29596bda5e961a7bcec42bcb08a287dd0a9ed7bf7a205003a87f974f9d9a37",
        "kohya": "8157238705569df74604bc705205693a46cd98448be245bd8dd0946848e3dbbb",
        "peft": "refused",
    },
    ("wan2.1", "LoHa"): {
        "comfyui": "bfa56cdcda9d48364a76f5a0fd84eb8ecd5766958b5988a900e3b8c9cd1f1303",
        "kohya": "39766943de5c65d300ec2db5dae1240a062e804b06669b664b405d43e974d0f8",
        "peft": "refused",
    },
    ("wan2.1", "LoKr"): {
        "comfyui": "6b58c529ed1362efeab546a39b711ccc9a3d1d3d544c14c48691ec6fc580a2d2",
        "kohya": "5f058256f5f8568d373b62f9e3613e1f2694ecda84460e7fc1ee4912355167a6",
        "peft": "refused",
    },
    ("wan2.1", "OFT"): {
        "comfyui": "6433150afef44e5b82546568731bce1896b7e5259acc7e3559dacafcfd749c2c",
        "kohya": "56911e02f3dba2e3284355ccdb727315639b5089dd04f9b2cde03c1651453bd9",
        "peft": "refused",
    },
}
PINNED |= WAN_PINNED


def tensors_digest(tensors: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for key in sorted(tensors):
        value = np.ascontiguousarray(tensors[key])
        digest.update(f"{key}|{value.dtype.str}|{value.shape}|".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def family_data(family: str):
    if family == "qwen-image":
        return make_dataset(*qwen_image_data(count=2, size=4))
    if family.startswith("flux2"):
        return make_dataset(*flux2_data(count=2, size=4))
    if family == "chroma":
        return make_dataset(*chroma_data(count=2, size=4))
    if family.startswith("wan"):
        return make_dataset(*video_data(count=2, frames=2, size=(4, 4)))
    if family in ("z-image", "lumina2"):
        latents, conditioning = nextdit_data(CONFIGS[family].cap_feat_dim, count=2, size=4)
        return make_dataset(latents, conditioning)
    if family.startswith("flux"):
        latents, conditioning = flux_data(count=2, size=4)
        return make_dataset(latents, conditioning)
    latents, context = demo_dataset(count=2, size=8)
    if family == "sdxl":
        rng = np.random.default_rng(5)
        return make_dataset(
            latents, {"c_crossattn": rng.standard_normal((1, 8, 2048)), "pooled_output": rng.standard_normal((1, 1280))}
        )
    if family == "sd2":
        return make_dataset(latents, np.random.default_rng(6).standard_normal((1, 8, 1024)).astype(np.float32))
    return make_dataset(latents, context)


def exported_digests(family: str, algorithm: str, folder) -> dict[str, str]:
    """Train two AdamW steps (batch 2, rank 2, fp32) and hash the adapter in each style ("refused" where the
    style cannot name it)."""
    path = write_random_checkpoint(CONFIGS[family], folder / f"{family}.safetensors", seed=7)
    model = load_model(path, dtype="fp32")
    config = TrainConfig(
        steps=2,
        batch_size=2,
        rank=2,
        algorithm=algorithm,
        learning_rate=0.01,
        seed=11,
        training_dtype="fp32",
        lora_dtype="fp32",
        gradient_checkpointing=False,
    )
    result = run_training(model, family_data(family), config, progress=lambda line: None)
    digests = {}
    for style in STYLES:
        try:
            tensors = export_adapter(result.model_with_lora, style, np.float32)
        except AdapterFileError:
            digests[style] = "refused"
        else:
            digests[style] = tensors_digest(tensors)
    return digests


@pytest.mark.parametrize(
    "family,algorithm",
    [(f, a) if (f, a) in IN_CI else pytest.param(f, a, marks=pytest.mark.slow) for f in CONFIGS for a in ALGORITHMS],
)
def test_exported_bytes_are_pinned(family, algorithm, tmp_path):
    assert exported_digests(family, algorithm, tmp_path) == PINNED[(family, algorithm)]
