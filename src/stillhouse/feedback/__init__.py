"""Feedback-guided distillation: the teacher (or a judge model) judges answers; pairs feed DPO."""
