"""Quantization formats: immutable values that own quantize / dequantize and bits per weight."""

from modelpress.formats.integer import IntFormat, QuantizedTensor, parse_int_format

__all__ = ["IntFormat", "QuantizedTensor", "parse_int_format"]
