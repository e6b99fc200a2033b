"""Image and text encoders that turn a folder of captioned images into a training dataset (and latents back
into images): Flax NNX networks loaded from the files ComfyUI loads."""
