"""The one exception type for mistakes a user can make in a config, a path or a file."""

import sys
from typing import Callable


class ConfigError(ValueError):
    """A bad input, explained in one line that names the fix. Never a bug in distill_llm."""


def cli_status(action: Callable[[], object]) -> int:
    """Run a module CLI's `action`: 0, or one `error:` line on stderr and 2 for a ConfigError."""
    try:
        action()
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
