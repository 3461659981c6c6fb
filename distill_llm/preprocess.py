"""`distill_llm.preprocess` moved to `distill_llm.data.preprocess`; this name keeps old imports and
`python -m distill_llm.preprocess` working (it is the same module object)."""

import sys

from distill_llm.data import preprocess as _moved

if __name__ == "__main__":
    sys.exit(_moved.main())
sys.modules[__name__] = _moved
