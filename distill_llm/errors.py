"""The one exception type for mistakes a user can make in a config, a path or a file."""


class ConfigError(ValueError):
    """A bad input, explained in one line that names the fix. Never a bug in distill_llm."""
