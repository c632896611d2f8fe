"""Errors a user can act on. Each message says what is wrong, where, and how to fix it."""


class AdaptflowError(Exception):
    """Base class: anything adaptflow reports to a user instead of a stack trace."""


class RecipeError(AdaptflowError, ValueError):
    """A recipe (or an override) is invalid. Carries every problem found, not just the first."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"recipe {source}: {len(self.problems)} problem(s)\n{lines}")


class DataError(AdaptflowError, ValueError):
    """Input data cannot be read or is unusable (missing, empty, undecodable, wrong fields)."""


class TrainingError(AdaptflowError, RuntimeError):
    """Training cannot continue (for example the loss became NaN)."""


class ConfigError(AdaptflowError, ValueError):
    """A setting that only turns out wrong once the model or data is known (e.g. block_size > positions)."""
