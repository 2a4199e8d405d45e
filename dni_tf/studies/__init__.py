"""Whole studies (sweeps, tables, figures) as importable code for CLIs and notebooks."""
