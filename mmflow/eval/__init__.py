"""Evaluation: metrics shared by the stages and tasks (and, to come, judges)."""
