"""User-facing errors.

Anything the user can fix (a bad path, a bad flag value, an unsupported model) raises `SlimError`.
The CLI prints its message on one line and exits with code 2; every other exception is a bug and keeps
its traceback.
"""


class SlimError(ValueError):
    """A problem with the user's input, with a message that names the problem and the fix."""


class MissingDependencyError(SlimError):
    """An optional backend (TensorRT, a GPU, tritonserver) is not available on this machine."""
