"""Stages: pure functions `run_<stage>(config, inputs) -> CheckpointRef`. One file per stage."""
