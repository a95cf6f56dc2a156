"""Quantizers and dequantizers: pure functions of arrays, no file I/O."""
