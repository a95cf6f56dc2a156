"""Block quantizers and dequantizers (NF4, ggml): pure functions of arrays, no file I/O."""
