"""`python -m jaxlora.dataset IMAGES --model CKPT --out FOLDER`: encode a folder of captioned images into a
jaxlora dataset folder for that model (VAE latents in aspect-ratio buckets, the family's text conditioning).

Train on the result with `python -m jaxlora.train --model CKPT --dataset FOLDER`. Running it again with the
same images, captions, files and settings re-uses the folder instead of encoding again.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jaxlora.dtypes import WEIGHT_DTYPES


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jaxlora.dataset", description=__doc__.splitlines()[0])
    parser.add_argument("images", type=Path, help="folder of images (png, jpg, webp) with same-named .txt captions")
    parser.add_argument("--model", type=Path, required=True, help="the checkpoint to train (.safetensors)")
    parser.add_argument("--out", type=Path, required=True, help="the dataset folder to write (must not exist)")
    parser.add_argument(
        "--resolution", type=int, help="bucket side in pixels: area resolution^2 (default: the model's, 512 or 1024)"
    )
    parser.add_argument("--vae", type=Path, help="VAE file, when the checkpoint has none (ComfyUI's models/vae/)")
    parser.add_argument(
        "--text-encoders", default="", help="text-encoder files, comma-separated (ComfyUI's models/text_encoders/)"
    )
    parser.add_argument(
        "--tokenizers",
        type=Path,
        help="folder of tokenizer files, e.g. ComfyUI's comfy/ folder (default: fetched once from the hub)",
    )
    parser.add_argument("--dtype", default="fp32", choices=WEIGHT_DTYPES, help="encoder weight dtype")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from jaxlora.encoders.make_dataset import ImageDatasetSettings, make_image_dataset
    from jaxlora.models.diffusion import load_model

    progress = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    try:
        resolution = args.resolution or load_model(args.model, weights=False).variant.resolution
        make_image_dataset(
            args.images,
            args.model,
            args.out,
            args.tokenizers,
            ImageDatasetSettings(resolution, dtype=args.dtype),
            vae_path=args.vae,
            text_encoders=[f.strip() for f in args.text_encoders.split(",") if f.strip()],
            progress=progress,
        )
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: nothing was written", file=sys.stderr)
        return 130
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
