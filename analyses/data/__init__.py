"""Prompt-set builders and project-written data."""
