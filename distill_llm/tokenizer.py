"""`distill_llm.tokenizer` moved to `distill_llm.data.tokenizer`; this name keeps old imports and
`python -m distill_llm.tokenizer` working (it is the same module object)."""

import sys

from distill_llm.data import tokenizer as _moved

if __name__ == "__main__":
    sys.exit(_moved.main())
sys.modules[__name__] = _moved
