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


def quiet_user_error_tracebacks() -> None:
    """Prefect logs a failed task or flow run with its traceback. For an `AdaptflowError` — bad input the user
    fixes, whose message already says what and how — the traceback is noise: keep the message, drop the stack."""
    import logging

    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _UserErrorsWithoutTraceback) for f in logger.filters):
            logger.addFilter(_UserErrorsWithoutTraceback())


class _UserErrorsWithoutTraceback:
    def filter(self, record) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], AdaptflowError):
            record.exc_info, record.exc_text = None, None
        return True
