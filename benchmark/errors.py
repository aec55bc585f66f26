"""Errors that the CLI turns into one clear line and a non-zero exit status."""
from __future__ import annotations


class AdvbenchError(Exception):
    """Base class; ``exit_code`` is what the CLI exits with."""

    exit_code = 1


class UsageError(AdvbenchError):
    """Bad user input: unknown name, malformed hyperparameters, ε out of range."""

    exit_code = 2


class DataError(AdvbenchError):
    """A dataset's files are missing or malformed."""

    exit_code = 2


class CheckpointError(AdvbenchError):
    """A checkpoint is missing, corrupt, foreign or incompatible."""

    exit_code = 2


class TrainingError(AdvbenchError):
    """Training diverged (NaN/inf loss); the last good checkpoint is kept."""

    exit_code = 3


class PerturbationError(AdvbenchError):
    """An attack returned x' outside [0,1] or outside its ε-ball."""

    exit_code = 4


class NonFiniteError(AdvbenchError):
    """Weights, outputs or results are NaN/inf: nothing is declared good or written."""

    exit_code = 3
