"""The one exception type a user sees: its message says what was wrong and how to fix it."""


class QtoolkitError(Exception):
    """A problem with the user's input or environment, reported as one clear line by the CLI."""
