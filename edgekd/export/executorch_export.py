"""ExecuTorch export: torch.export → edge dialect lowered to XNNPACK → ``.pte``.

Two things learned on executorch 1.5.1 + torch 2.13 that this module handles:

- ExecuTorch plans memory for the *upper bound* of a dynamic batch axis, so the ``.pte``
  accepts batches up to ``max_batch``, no larger.
- XNNPACK's lowering re-runs each convolution on fake tensors, and PyTorch's CPU convolution
  backend choice (oneDNN/NNPACK heuristics on ``batch >= 16``) then installs a guard that
  silently narrows the batch range to ``<= 15``: a ``.pte`` exported for batches up to 256
  refused batch 32. Disabling those two backends while lowering (they only pick CPU kernels for
  PyTorch's own eager convolutions, which the ``.pte`` never uses) keeps the declared range.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgekd.errors import RuntimeUnavailableError, StageError
from edgekd.export.prepare import eval_on_cpu, example_for, one_line, quiet_exporters
from edgekd.fileio import atomic_write_bytes

#: bookkeeping nodes (tuple unpacking, reading a symbolic size) are not computation
_BOOKKEEPING_OPS = {"getitem", "sym_size"}


@contextlib.contextmanager
def _keep_batch_range() -> Iterator[None]:
    with torch.backends.mkldnn.flags(enabled=False), torch.backends.nnpack.flags(enabled=False):
        yield


def _require_executorch() -> None:
    import importlib.util

    if importlib.util.find_spec("executorch") is None:
        raise RuntimeUnavailableError("ExecuTorch export needs the executorch package: pip install 'edgekd[mobile]'")


def delegation_facts(graph_module: torch.fx.GraphModule) -> dict[str, Any]:
    """How many compute nodes went to XNNPACK, and which operators stayed on ExecuTorch's CPU kernels."""
    from executorch.devtools.backend_debug import get_delegation_info

    info = get_delegation_info(graph_module)
    delegated: Counter[str] = Counter()
    kept: Counter[str] = Counter()
    for op, row in info.delegation_by_operator.items():
        if op in _BOOKKEEPING_OPS:
            continue
        if row.delegated:
            delegated[op] += row.delegated
        if row.non_delegated:
            kept[op] += row.non_delegated
    return {
        "backend": "XnnpackBackend",
        "delegated_subgraphs": info.num_delegated_subgraphs,
        "delegated_nodes": sum(delegated.values()),
        "non_delegated_nodes": sum(kept.values()),
        "delegated_ops": dict(sorted(delegated.items())),
        "non_delegated_ops": dict(sorted(kept.items())),
    }


def export_pte(model: nn.Module, example: torch.Tensor, path: Path, *, dynamic_batch: bool = True,
               max_batch: int = 256) -> dict[str, Any]:
    """Export ``model`` to an XNNPACK-delegated ``.pte``; return facts (size, delegation, batch range)."""
    _require_executorch()
    path = Path(path)
    dynamic = dynamic_batch and max_batch >= 2
    with eval_on_cpu(model) as net, quiet_exporters(), _keep_batch_range():
        # imported here, quietly: the first import logs torchao and pytree notices
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower

        x = example_for(example, dynamic)
        dynamic_shapes = ({0: torch.export.Dim("batch", min=1, max=max_batch)},) if dynamic else None
        try:
            program = torch.export.export(net, (x,), dynamic_shapes=dynamic_shapes)
        except Exception as exc:  # torch.export raises UserError, Unsupported, GuardOnDataDependent...
            raise StageError(f"torch.export could not capture the model for ExecuTorch: {one_line(exc)}",
                             hint="make the model traceable (no data-dependent Python control flow)") from exc
        try:
            edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
            facts = delegation_facts(edge.exported_program().graph_module)
            buffer = edge.to_executorch().buffer
        except Exception as exc:  # lowering raises plain Exceptions from passes and the serializer
            raise StageError(f"ExecuTorch lowering to XNNPACK failed: {one_line(exc)}") from exc
    atomic_write_bytes(path, buffer)
    return {"exporter": "torch.export + executorch.exir.to_edge_transform_and_lower",
            "file_bytes": path.stat().st_size, "dynamic_batch": dynamic,
            "max_batch": max_batch if dynamic else 1, **facts}
