"""Imports every stage module so each registers itself with ``@register_stage``."""

# one import line per stage module, e.g.: import edgekd.prune.stage  # noqa: F401
import edgekd.bench.stage  # noqa: F401
import edgekd.cluster.stage  # noqa: F401
import edgekd.distill.stage  # noqa: F401
import edgekd.export.stage  # noqa: F401
import edgekd.lowrank.stage  # noqa: F401
import edgekd.prune.stage  # noqa: F401
import edgekd.quantize.stage  # noqa: F401
