"""Distillation losses and the student trainer."""
