"""`distill_llm.hf` moved to `distill_llm.formats.hf`; this name keeps old imports and
`python -m distill_llm.hf` working (it is the same module object)."""

import sys

from distill_llm.formats import hf as _moved

if __name__ == "__main__":
    sys.exit(_moved.main())
sys.modules[__name__] = _moved
