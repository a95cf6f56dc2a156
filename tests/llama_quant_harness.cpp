// Runs llama.cpp's own tensor-type selection on tensor names and shapes read from stdin: the
// functions of src/llama-quant.cpp, cut verbatim from the llama-cpp-python sdist into
// llama-quant-selection.inc by tests/ggml_ref.py, with a stand-in llama_model that carries only
// the fields they read, and the few ggml queries they call (values of ggml.c's type traits).
#include "llama.h"
#include "llama-arch.h"
#include "llama-impl.h"
#include <algorithm>
#include <cinttypes>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <map>
#include <regex>
#include <stdexcept>
#include <string>
#include <vector>

enum llm_type { LLM_TYPE_UNKNOWN, LLM_TYPE_70B };
struct harness_hparams {
    uint32_t n_expert = 0, n_layer_all = 0, n_head = 0, n_head_kv = 0;
    uint32_t n_gqa() const { return n_head_kv ? n_head / n_head_kv : 0; }
};
struct llama_model { llm_arch arch; llm_type type = LLM_TYPE_UNKNOWN; harness_hparams hparams; };
struct quantize_state_impl;

#include "llama-quant-selection.inc"

// the ggml queries the selection code calls (the values of ggml.c's type traits)
int64_t ggml_blck_size(enum ggml_type t) {
    switch (t) {
        case GGML_TYPE_F32: case GGML_TYPE_F16: case GGML_TYPE_BF16: return 1;
        case GGML_TYPE_Q4_0: case GGML_TYPE_Q4_1: case GGML_TYPE_Q5_0: case GGML_TYPE_Q5_1:
        case GGML_TYPE_Q8_0: case GGML_TYPE_IQ4_NL: return 32;
        case GGML_TYPE_Q2_K: case GGML_TYPE_Q3_K: case GGML_TYPE_Q4_K: case GGML_TYPE_Q5_K:
        case GGML_TYPE_Q6_K: return 256;
        default: fprintf(stderr, "unexpected type %d\n", (int) t); abort();
    }
}
bool ggml_is_quantized(enum ggml_type t) { return ggml_blck_size(t) > 1; }
const char * ggml_type_name(enum ggml_type t) { static char b[16]; snprintf(b, 16, "%d", (int) t); return b; }
const char * ggml_get_name(const struct ggml_tensor * t) { return t->name; }
int ggml_n_dims(const struct ggml_tensor * t) {
    for (int i = GGML_MAX_DIMS - 1; i >= 1; --i) if (t->ne[i] > 1) return i + 1;
    return 1;
}
void ggml_abort(const char *, int, const char * fmt, ...) { fprintf(stderr, "abort: %s\n", fmt); abort(); }
void llama_log_internal(ggml_log_level, const char *, ...) {}
std::string format(const char * fmt, ...) {
    va_list ap; va_start(ap, fmt); char buf[1024]; vsnprintf(buf, sizeof buf, fmt, ap); va_end(ap);
    return buf;
}

// stdin: "ARCH N_LAYER N_HEAD N_HEAD_KV N_EXPERT FTYPE PURE", then "NAME NE0 NE1 NE2 NE3" lines.
// stdout: "NAME TYPE" for each tensor llama-quantize may quantize, "NAME keep" for the others.
int main() {
    std::string arch; uint32_t n_layer, n_head, n_head_kv, n_expert; int ftype, pure;
    std::cin >> arch >> n_layer >> n_head >> n_head_kv >> n_expert >> ftype >> pure;
    llama_model model;
    model.arch = llm_arch_from_string(arch);
    if (model.arch == LLM_ARCH_LLAMA && n_layer == 80 && n_head != n_head_kv) model.type = LLM_TYPE_70B;
    model.hparams.n_layer_all = n_layer; model.hparams.n_head = n_head;
    model.hparams.n_head_kv = n_head_kv; model.hparams.n_expert = n_expert;
    llama_model_quantize_params params = llama_model_quantize_default_params();
    params.pure = pure != 0;
    quantize_state_impl qs(model, &params);

    std::vector<ggml_tensor> all;
    std::string name; int64_t ne[4];
    while (std::cin >> name >> ne[0] >> ne[1] >> ne[2] >> ne[3]) {
        ggml_tensor t; memset(&t, 0, sizeof t);
        t.type = GGML_TYPE_F32;
        for (int i = 0; i < 4; ++i) t.ne[i] = ne[i];
        strncpy(t.name, name.c_str(), GGML_MAX_NAME - 1);
        all.push_back(t);
    }
    std::vector<ggml_tensor *> quantizable;  // as tests/test-quant-type-selection.cpp builds them
    for (auto & t : all) {
        if (tensor_allows_quantization(&params, model.arch, &t)) quantizable.push_back(&t);
        else printf("%s keep\n", t.name);
    }
    std::sort(quantizable.begin(), quantizable.end(), [](const ggml_tensor * a, const ggml_tensor * b) {
        int la = -1, lb = -1;
        sscanf(a->name, "blk.%d.", &la); sscanf(b->name, "blk.%d.", &lb);
        return la != lb ? la < lb : strcmp(a->name, b->name) < 0;
    });
    std::vector<ggml_type> types(quantizable.size());
    llama_quant_compute_types(&qs, (llama_ftype) ftype, quantizable.data(), types.data(), quantizable.size());
    for (size_t i = 0; i < quantizable.size(); ++i) printf("%s %d\n", quantizable[i]->name, (int) types[i]);
    return 0;
}
