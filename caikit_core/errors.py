"""The exceptions caikit raises for bad input.

Every error a user can cause derives from :class:`CaikitError`. The CLI prints its
message on one line group, exits with status 2 and shows no traceback unless
``--debug`` is given.
"""

from __future__ import annotations


class CaikitError(Exception):
    """Base class of every user-facing caikit error."""


class ConfigError(CaikitError):
    """A run file that cannot be read, parsed or validated.

    ``problems`` holds one line per problem, each ``key.path: what is wrong``.
    """

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = list(problems)
        lines = "\n".join(f"  {p}" for p in self.problems)
        noun = "problem" if len(self.problems) == 1 else "problems"
        super().__init__(f"{source}: {len(self.problems)} config {noun}:\n{lines}")

    def __reduce__(self) -> tuple[type[ConfigError], tuple[str, list[str]]]:
        return (type(self), (self.source, self.problems))


class PluginError(CaikitError):
    """A plugin that cannot be loaded, validated or registered."""


class FingerprintError(CaikitError):
    """A stage whose fingerprint cannot be computed (never replaced by a random key)."""


class StoreError(CaikitError):
    """A run directory that is missing, locked, or inconsistent."""


class StageError(CaikitError):
    """A stage that failed on a record; the message names the stage and record id."""


class ConstitutionError(CaikitError):
    """A constitution that cannot be read, parsed, validated or converted.

    ``source`` names the file or directory ("" when there is none); ``problems``
    holds one line per problem, e.g. ``critique_revision[3] (id 'harmful3'):
    'revision' is missing``.
    """

    def __init__(self, source: str, problems: str | list[str]) -> None:
        self.source = source
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        prefix = f"{source}: " if source else ""
        if len(self.problems) == 1:
            message = f"{prefix}{self.problems[0]}"
        else:
            lines = "\n".join(f"  {p}" for p in self.problems)
            message = f"{prefix}{len(self.problems)} constitution problems:\n{lines}"
        super().__init__(message)

    def __reduce__(self) -> tuple[type[ConstitutionError], tuple[str, list[str]]]:
        return (type(self), (self.source, self.problems))


class TrainingStopped(CaikitError):
    """A training run stopped on a guard (e.g. KL above its bound, a non-finite loss).

    ``checkpoint`` is the folder the trainer saved before stopping, if any; the
    runner keeps it (it is not a completed stage) and names it in the error.
    """

    def __init__(self, message: str, checkpoint: str | None = None) -> None:
        self.checkpoint = checkpoint
        super().__init__(message)
