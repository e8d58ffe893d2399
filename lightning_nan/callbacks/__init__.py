"""Namespace-free callback logic; the importable classes live in ``lightning_nan`` and ``lightning_nan.lightning``."""
