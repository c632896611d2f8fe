"""Tracking: MLflow runs, parameters, metrics and dataset inputs (`runs`), reusing a finished stage by its cache
key and rerunning a build (`reuse`), the model registry's challenger → champion promotions (`registry`), and each
build's HTML report (`report`). Everything goes through an explicit `MlflowClient` and run ids."""
