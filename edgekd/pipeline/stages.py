"""Imports every stage module so each registers itself with ``@register_stage``."""

# one import line per stage module, e.g.: import edgekd.prune.stage  # noqa: F401
