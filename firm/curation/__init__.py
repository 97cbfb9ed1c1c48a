"""Reward-data curation: difference-first (editing) and plan-then-score (generation) pipelines with teacher models."""
