"""Models: building the base model (`builders`), writing and reading checkpoints (`checkpoints`), and finding
the layers and heads inside one (`layers`)."""

from adaptflow.models.builders import (
    build_tiny_model,
    convert_pickle_weights,
    materialize_base_model,
    packaged_model_path,
    pickle_refusal,
    pickle_weights,
    train_tokenizer,
)
from adaptflow.models.checkpoints import (
    ENCODER_TYPES,
    LINEAGE_FILE,
    checkpoint_digest,
    checkpoint_parameter_names,
    infer_objective,
    load_model,
    load_task_model,
    load_tokenizer,
    quiet_transformers,
    read_lineage,
    save_checkpoint,
    verified_path,
)
from adaptflow.models.layers import (
    is_head,
    layer_groups,
    reinitialise_head,
    reinitialise_pooler,
    transformer_layers,
)

__all__ = [
    "ENCODER_TYPES", "LINEAGE_FILE", "build_tiny_model", "checkpoint_digest", "checkpoint_parameter_names",
    "convert_pickle_weights", "infer_objective", "is_head", "layer_groups", "load_model", "load_task_model",
    "load_tokenizer", "materialize_base_model", "packaged_model_path", "pickle_refusal", "pickle_weights",
    "quiet_transformers", "read_lineage", "reinitialise_head", "reinitialise_pooler", "save_checkpoint",
    "train_tokenizer", "transformer_layers", "verified_path",
]
