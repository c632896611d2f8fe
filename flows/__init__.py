"""Prefect flows (`build`) and the `adaptflow` command line."""
