/* The few ggml.c symbols ggml-quants.c links against, so that it builds alone into a small
 * shared library for the tests, plus llama.cpp's own fp32 -> fp16/bf16 row conversions (the
 * bodies of ggml_fp32_to_fp16_row and ggml_fp32_to_bf16_row_ref in ggml.c). */
#include <stdlib.h>
#include "ggml.h"
#include "ggml-impl.h"

void ggml_abort(const char * file, int line, const char * fmt, ...) { (void) file; (void) line; (void) fmt; abort(); }
size_t ggml_row_size(enum ggml_type type, int64_t ne) { (void) type; (void) ne; abort(); }
size_t ggml_type_size(enum ggml_type type) { (void) type; abort(); }
const char * ggml_type_name(enum ggml_type type) { (void) type; return "?"; }

void ref_fp32_to_fp16_row(const float * x, ggml_fp16_t * y, int64_t n) {
    for (int64_t i = 0; i < n; ++i) y[i] = GGML_FP32_TO_FP16(x[i]);
}

void ref_fp32_to_bf16_row(const float * x, ggml_bf16_t * y, int64_t n) {
    for (int64_t i = 0; i < n; ++i) y[i] = ggml_compute_fp32_to_bf16(x[i]);
}
