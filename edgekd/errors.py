"""Every error edgekd raises on purpose.

Each carries a ``hint`` that tells the user what to do next. The CLI is the only place that
turns these into exit codes; library code raises and never exits.
"""

from __future__ import annotations


class EdgekdError(Exception):
    """Base class: an expected failure with a message meant for the user."""

    exit_code: int = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"

    def __reduce__(self):
        # Errors cross process boundaries (the export stage runs a role in a child process).
        # Exception's default pickling re-calls __init__ with ``args`` alone, which would drop
        # ``hint`` and subclass fields (a ParityError's numbers), so restore the whole state.
        return _restore_error, (type(self), self.args, self.__dict__)


def _restore_error(cls: type[EdgekdError], args: tuple, state: dict) -> EdgekdError:
    error = cls.__new__(cls)
    Exception.__init__(error, *args)
    error.__dict__.update(state)
    return error


class ConfigError(EdgekdError):
    """Bad user input known before any work starts (a recipe, an override, a CLI argument)."""

    exit_code = 2


class RecipeError(ConfigError):
    """A recipe problem located at a file, line and dotted key."""

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        line: int | None = None,
        key: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.file, self.line, self.key = file, line, key
        where = ":".join(str(p) for p in (file, line) if p is not None)
        prefix = f"{where}: " if where else ""
        keypart = f"{key}: " if key else ""
        super().__init__(f"{prefix}{keypart}{message}", hint)


class DataError(EdgekdError):
    """A dataset could not be found, read or split."""

    exit_code = 2


class ModelError(EdgekdError):
    """A model could not be built or a checkpoint did not fit it."""

    exit_code = 2


class StageError(EdgekdError):
    """A stage failed while running; earlier artifacts stay in the run directory."""


class ArtifactError(StageError):
    """An artifact file (.onnx, .ort, .pte, .pt) that is missing, truncated, corrupt or of another format.

    Exit code 2: the file is the user's input (``edgekd benchmark FILE``); inside a run it means an
    earlier stage's output was damaged on disk, and re-exporting fixes it either way.
    """

    exit_code = 2


class TargetUnreachableError(StageError):
    """A pruning/quantization target could not be met; the message names the best figure reached."""


class TrainingDivergedError(StageError):
    """A loss became NaN or infinite; the last good checkpoint is kept."""


class ParityError(StageError):
    """An exported artifact disagrees with the PyTorch model beyond the recipe's tolerance."""

    def __init__(self, message: str, *, outputs: list[dict] | None = None, hint: str | None = None):
        self.outputs = outputs or []
        super().__init__(message, hint)


class RuntimeUnavailableError(EdgekdError):
    """An optional runtime package is not installed."""

    exit_code = 2


class RunLockedError(EdgekdError):
    """Another edgekd process holds the run directory."""

    exit_code = 2


class GateFailedError(EdgekdError):
    """The student lost more accuracy than the recipe's gate allows (the report is still written)."""

    exit_code = 3
