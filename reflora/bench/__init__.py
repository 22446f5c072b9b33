"""Benchmarks behind the ``reflora`` command (``python -m reflora ...``)."""
