"""Low-bit weights: int4 and int8 linear layers on PyTorch's own low-bit matmul ops, GGUF
blocks loaded into them without a float round trip, and dense checkpoints quantized at load."""

from sorai.model.quant.linear import Int4Linear, Int8Linear, LowBitLinear

QUANTIZE_CHOICES = ("auto", "none", "int8", "int4")

__all__ = ["QUANTIZE_CHOICES", "Int4Linear", "Int8Linear", "LowBitLinear"]
