"""Quantised frozen bases (QLoRA): the block formats, ``Quantized`` leaves, and GGUF's own blocks."""
