"""Evaluation: language-model (pseudo-)perplexity before and after (`perplexity`), a model scored on a labelled
split by its task kind (`scoring`), the fine-tuned model's test/OOD/robustness suite (`suite`) and the promotion
gates (`gates`). Nothing here imports a stage: stages and the evaluate stage build on it."""
