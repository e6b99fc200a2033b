"""Adapters (LoRA, LoHa, LoKr, OFT, diffs) as a separate trainable tree on a frozen network, and their files."""
