"""Evaluation side: attacks on a trained run, feature metrics, corruptions."""
