"""Experiments that train many runs: hyperparameter search (tuning) and cell comparison."""
