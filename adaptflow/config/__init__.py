"""Recipe sections and their value types. The stages' own sections live with each stage
(`adaptflow.stages.<name>.Config`); the whole recipe, and loading it, in `adaptflow.recipe`."""

from adaptflow.config.base import (
    CorpusName,
    DatasetName,
    Fraction,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Probability,
    Reference,
    Section,
    TaskName,
    one_of,
)
from adaptflow.config.optimization import Optimization
from adaptflow.config.sections import (
    CorpusConfig,
    DistributedConfig,
    ModelConfig,
    RegistryConfig,
    ScheduleConfig,
    TaskDataConfig,
    TinyModelConfig,
    TrackingConfig,
)

__all__ = [
    "CorpusConfig", "CorpusName", "DatasetName", "DistributedConfig", "Fraction", "ModelConfig", "NonNegativeInt",
    "Optimization", "PositiveFloat", "PositiveInt", "Probability", "Reference", "RegistryConfig", "ScheduleConfig",
    "Section", "TaskDataConfig", "TaskName", "TinyModelConfig", "TrackingConfig", "one_of",
]
