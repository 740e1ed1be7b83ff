"""Tests of the model library (llmasos/library) and its CLI commands."""
