"""`distill_llm.teacher_cache` moved to `distill_llm.kd.teacher_cache`; this name keeps old
imports working (it is the same module object)."""

import sys

from distill_llm.kd import teacher_cache as _moved

sys.modules[__name__] = _moved
