"""Integrations with training frameworks; each submodule imports its framework on import."""
