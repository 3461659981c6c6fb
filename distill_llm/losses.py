"""`distill_llm.losses` moved to `distill_llm.kd.losses`; this name keeps old imports working
(it is the same module object)."""

import sys

from distill_llm.kd import losses as _moved

sys.modules[__name__] = _moved
