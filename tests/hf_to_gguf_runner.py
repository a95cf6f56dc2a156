"""Run llama.cpp's convert_hf_to_gguf.py from the sdist: ROOT MODEL_DIR=OUTTYPE=OUTFILE ...

The converter as shipped, with its own gguf-py, except that the vocabulary step is skipped (the
fixtures' tokenizers are not among the pre-tokenizers it recognises, and the tests compare tensors).
"""

import os
import runpy
import sys

root, *jobs = sys.argv[1:]
sys.path.insert(0, root)
sys.path.insert(1, os.path.join(root, "gguf-py"))
import conversion.base as base  # noqa: E402

prepare = base.TextModel.prepare_metadata


def prepare_without_vocab(self, vocab_only):
    self.set_vocab = lambda: None
    prepare(self, vocab_only)


base.TextModel.prepare_metadata = prepare_without_vocab
main = runpy.run_path(os.path.join(root, "convert_hf_to_gguf.py"))["main"]
for job in jobs:
    model, outtype, outfile = job.split("=", 2)
    sys.argv = ["convert_hf_to_gguf.py", model, "--outfile", outfile, "--outtype", outtype]
    main()
