"""Run llama.cpp's convert_lora_to_gguf.py from the sdist: ROOT BASE ADAPTER=OUTTYPE=OUTFILE ...

The converter as shipped, with its own gguf-py and conversion package, once per job in one
process (its imports of torch and transformers dominate the time).
"""

import os
import runpy
import sys

root, base, *jobs = sys.argv[1:]
sys.path.insert(0, root)
for job in jobs:
    adapter, outtype, outfile = job.split("=", 2)
    sys.argv = ["convert_lora_to_gguf.py", adapter, "--base", base, "--outfile", outfile]
    sys.argv += ["--outtype", outtype]
    runpy.run_path(os.path.join(root, "convert_lora_to_gguf.py"), run_name="__main__")
