"""The one error type the user sees: a one-line message naming the problem."""


class TinyLLMError(Exception):
    """A problem with the user's input (model file, prompt, flags), explained in one line."""
