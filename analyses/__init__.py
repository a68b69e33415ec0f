"""Analyzers: one module per method."""
