"""The forward check: the candidate's logits against transformers + PEFT running the adapters.

The only module that imports transformers and peft (the `loramerge[verify]` extra). Both models
run in float32 on the CPU over a fixed set of prompts, tokenized with the base's tokenizer
(fixed token ids when the base has none).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from loramerge.errors import LoramergeError

# Fixed, documented probe set (docs/verify.md): plain prose, code, a list and a question.
PROMPTS = (
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "Shopping list: eggs, milk, flour, sugar, butter.",
    "What is the capital of France? The capital of France is Paris.",
)
# A correct merge differs from the unmerged model only by the rounding of its stored weights.
MAX_MEAN_KL = 1e-3
# Where the reference's two best logits are closer than this, rounding may pick either: such a
# near-tie is reported but not held against the candidate.
TIE_MARGIN = 1e-2


def verify_forward(candidate: Path, base: Path, adapters: list[Path], weights: list[float]) -> dict:
    """Logit statistics of CANDIDATE vs BASE + adapters (unmerged); `passed` inside."""
    if Path(candidate).suffix == ".gguf":
        return _gguf_forward(Path(candidate), base, adapters, weights)
    if _is_nf4(Path(candidate)):
        return _skipped("NF4 candidates get the weight check only (transformers runs NF4 on CUDA)")
    try:
        import transformers
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise LoramergeError(
            "--forward needs transformers and peft: pip install 'loramerge[verify]'"
        ) from None
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _run(
            AutoModelForCausalLM, AutoTokenizer, PeftModel, candidate, base, adapters, weights
        )


def _run(auto_model, auto_tokenizer, peft_model, candidate, base, adapters, weights) -> dict:
    """Load both models, compare, and judge."""
    model = auto_model.from_pretrained(candidate, dtype=torch.float32).eval()
    reference = auto_model.from_pretrained(base, dtype=torch.float32)
    vocab = model.get_input_embeddings().weight.shape[0]
    if adapters and reference.get_input_embeddings().weight.shape[0] != vocab:
        reference.resize_token_embeddings(vocab, mean_resizing=False)
    if adapters:
        reference = _with_adapters(peft_model, reference, adapters, weights)
    reference.eval()
    probes, source = _probes(auto_tokenizer, base, vocab)
    return _judge({**_compare(model, reference, probes), "probes": source})


def _judge(stats: dict) -> dict:
    """Pass when the KL is small and top-1 agrees everywhere but at near-ties."""
    decisive = stats["top1_agreement_outside_ties"] == 1.0
    stats["passed"] = decisive and stats["mean_kl"] <= MAX_MEAN_KL
    stats["summary"] = (
        f"top-1 agreement {stats['top1_agreement']:.2%} ({stats['top1_agreement_outside_ties']:.2%}"
        f" outside {stats['near_ties']} near-ties), mean KL {stats['mean_kl']:.2e}, "
        f"max |dlogit| {stats['max_abs_logit_diff']:.3g}, perplexity "
        f"{stats['perplexity_candidate']:.4g} vs {stats['perplexity_reference']:.4g}"
    )
    return stats


def _with_adapters(peft_model, model, adapters: list[Path], weights: list[float]):
    """PEFT model with every adapter active, each scaled by its weight."""
    names = [f"adapter{i}" for i in range(len(adapters))]
    model = peft_model.from_pretrained(model, str(adapters[0]), adapter_name=names[0])
    for name, adapter in zip(names[1:], adapters[1:], strict=True):
        model.load_adapter(str(adapter), adapter_name=name)
    model.base_model.set_adapter(names)
    for module in model.modules():
        scaling = getattr(module, "scaling", None)
        if isinstance(scaling, dict):
            for name, weight in zip(names, weights, strict=True):
                if name in scaling:
                    if weight != 1.0 and getattr(module, "use_dora", {}).get(name):
                        raise LoramergeError("--forward cannot weight a DoRA adapter (PEFT cannot)")
                    scaling[name] *= weight
    return model


def _probes(auto_tokenizer, base: Path, vocab: int) -> tuple[list[torch.Tensor], str]:
    """Token ids of the fixed prompts, or fixed pseudo-random ids when the base has no tokenizer.

    The ids only need to be the same for both models; a base without a loadable tokenizer (a
    bare weights folder) still gets a forward check.
    """
    try:
        tokenizer = auto_tokenizer.from_pretrained(base)
        return [tokenizer(p, return_tensors="pt")["input_ids"] for p in PROMPTS], "prompts"
    except (OSError, ValueError, TypeError) as exc:
        generator = torch.Generator().manual_seed(0)
        ids = [torch.randint(0, vocab, (1, 24), generator=generator) for _ in PROMPTS]
        reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        return ids, f"fixed token ids: the base's tokenizer does not load ({reason})"


@torch.no_grad()
def _compare(model, reference, probes: list[torch.Tensor]) -> dict:
    max_diff = kl_sum = 0.0
    agree = positions = ties = decisive_agree = 0
    nll = {"candidate": 0.0, "reference": 0.0}
    for ids in probes:
        ours = model(input_ids=ids).logits[0].double()
        theirs = reference(input_ids=ids).logits[0].double()
        max_diff = max(max_diff, float((ours - theirs).abs().max()))
        log_p, log_q = theirs.log_softmax(-1), ours.log_softmax(-1)
        kl_sum += float((log_p.exp() * (log_p - log_q)).sum())
        same = ours.argmax(-1) == theirs.argmax(-1)
        top2 = theirs.topk(2, dim=-1).values
        tie = (top2[:, 0] - top2[:, 1]) < TIE_MARGIN
        agree += int(same.sum())
        ties += int(tie.sum())
        decisive_agree += int((same & ~tie).sum())
        positions += ids.shape[1]
        targets = ids[0, 1:]
        for key, logp in (("candidate", log_q), ("reference", log_p)):
            nll[key] += float(-logp[:-1].gather(1, targets[:, None]).sum())
    predicted = positions - len(probes)
    return {
        "prompts": len(probes),
        "positions": positions,
        "max_abs_logit_diff": max_diff,
        "mean_kl": kl_sum / positions,
        "top1_agreement": agree / positions,
        "near_ties": ties,
        "top1_agreement_outside_ties": decisive_agree / max(positions - ties, 1),
        "perplexity_candidate": float(torch.tensor(nll["candidate"] / predicted).exp()),
        "perplexity_reference": float(torch.tensor(nll["reference"] / predicted).exp()),
    }


def _skipped(reason: str) -> dict:
    """A forward check that could not run: said plainly, not counted as a failure."""
    return {"skipped": True, "passed": True, "summary": f"skipped: {reason}"}


def _is_nf4(candidate: Path) -> bool:
    from loramerge.verify.quantized import NF4Candidate
    from loramerge.verify.weights import open_quantized

    reader = open_quantized(candidate, allow_pickle=False)
    if reader is None:
        return False
    reader.close()
    return isinstance(reader, NF4Candidate)


def _plain_llama(llama_cpp, path: Path):
    """llama_cpp.Llama with the weights in plain buffers: the repacking "extra buffer types"
    (AMX where the CPU reports it) die with an illegal instruction on VMs that report AMX without
    enabling it, and only change which matmul kernels run. Llama() takes no such option, so its
    default model parameters are amended while it loads."""
    defaults = llama_cpp.llama_cpp.llama_model_default_params

    def plain():
        params = defaults()
        params.use_extra_bufts = False
        return params

    llama_cpp.llama_cpp.llama_model_default_params = plain
    try:
        return llama_cpp.Llama(
            model_path=str(path), logits_all=True, n_ctx=256, verbose=False, n_threads=2
        )
    finally:
        llama_cpp.llama_cpp.llama_model_default_params = defaults


def _gguf_forward(candidate: Path, base: Path, adapters: list[Path], weights: list[float]) -> dict:
    """llama.cpp's logits for the GGUF (through llama-cpp-python) against transformers + PEFT."""
    try:
        import llama_cpp
    except ImportError:
        return _skipped("llama-cpp-python is not installed (pip install llama-cpp-python)")
    import transformers
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.logging.set_verbosity_error()
    reference = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    vocab = reference.get_input_embeddings().weight.shape[0]
    if adapters:
        reference = _with_adapters(PeftModel, reference, adapters, weights)
    reference.eval()
    model = _plain_llama(llama_cpp, candidate)

    class _Llama:  # the two calls _compare makes, answered by llama.cpp
        def __call__(self, input_ids):
            model.reset()
            model.eval(input_ids[0].tolist())
            logits = torch.tensor(model.scores[: input_ids.shape[1]], dtype=torch.float32)
            return type("Out", (), {"logits": logits[None]})()

    probes, source = _probes(AutoTokenizer, base, vocab)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stats = _judge({**_compare(_Llama(), reference, probes), "probes": source})
    # A quantized model is not expected to match to the KL bound: figures, not a verdict.
    stats.update(judged=False, passed=True)
    stats["summary"] = f"llama.cpp (figures only, quantized): {stats['summary']}"
    return stats
