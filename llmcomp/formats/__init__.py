"""Checkpoint format (read/write/validate) and exporters."""
