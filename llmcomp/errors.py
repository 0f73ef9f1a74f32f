"""User-facing errors: the CLI prints them as one line, never a traceback."""


class LlmcompError(Exception):
    """A problem with the user's input (bad recipe, corrupt checkpoint, missing file, ...)."""


class CheckpointError(LlmcompError):
    """A checkpoint is missing, incomplete or inconsistent; the message names the file/tensor/field."""


class RecipeError(LlmcompError):
    """A recipe failed validation; the message names the bad key and the allowed values."""
