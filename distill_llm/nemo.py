"""`python -m distill_llm.nemo export CHECKPOINT OUTPUT [--format nemo1|nemo2]`: write any
checkpoint (ours, Hugging Face or NeMo) as a NeMo 1 `.nemo` file or a NeMo 2 directory. The
code lives in `distill_llm.formats.nemo` (reading: `checkpoint`, writing: `io`)."""

import sys

from distill_llm.formats.nemo.io import export_nemo, main

__all__ = ["export_nemo", "main"]

if __name__ == "__main__":
    sys.exit(main())
