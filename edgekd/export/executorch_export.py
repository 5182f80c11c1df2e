"""ExecuTorch export: torch.export → edge dialect lowered to XNNPACK → ``.pte``.

Two things learned on executorch 1.5.1 + torch 2.13 that this module handles:

- ExecuTorch plans memory for the *upper bound* of a dynamic batch axis, so the ``.pte``
  accepts batches up to ``max_batch``, no larger.
- XNNPACK's lowering re-runs each convolution on fake tensors, and PyTorch's CPU convolution
  backend choice (oneDNN/NNPACK heuristics on ``batch >= 16``) then installs a guard that
  silently narrows the batch range to ``<= 15``: a ``.pte`` exported for batches up to 256
  refused batch 32. Disabling those two backends while lowering (they only pick CPU kernels for
  PyTorch's own eager convolutions, which the ``.pte`` never uses) keeps the declared range.

A failure keeps its whole cause (the verifier names the operator and the user's source line
after the first line), and a graph with complex tensors (``torch.fft``) is named as such: neither
ExecuTorch's edge dialect nor XNNPACK takes complex dtypes. The facts say what share of the
compute operators XNNPACK runs, with a warning below ``MIN_DELEGATED_SHARE``: operators left on
ExecuTorch's portable CPU kernels run many times slower (a weight-normalised TCN with 6 of 7
convolutions outside XNNPACK ran about 60x slower than ONNX Runtime).

- ExecuTorch's ``split_with_sizes_copy`` kernel cannot resize its outputs: a ``torch.split`` or
  ``.chunk`` on the channel axis (a partial convolution, a chunk-in-two gate) gave a ``.pte`` that
  ran only at the example batch of 2 ("Attempted to resize a static tensor" at batch 1, 3, 64).
  Those splits (``torch.split``, ``.chunk``, their ``unsafe_`` forms) are rewritten as slices
  before lowering (``_EXPORT_DECOMPOSITIONS``), which resize with the batch; the values are the same
  (the slices are the split's sections).
- ``F.adaptive_max_pool2d`` is not in the Core ATen opset (the edge dialect raises
  ``SpecViolationError``); where the input's size is a multiple of the output's (a global max pool) it
  is the ``max_pool2d`` with kernel = stride = the window, and is rewritten so before lowering.
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
from edgekd.export.prepare import eval_on_cpu, example_for, quiet_exporters, whole_cause
from edgekd.fileio import atomic_write_bytes

#: bookkeeping nodes (tuple unpacking, reading a symbolic size) are not computation
_BOOKKEEPING_OPS = {"getitem", "sym_size"}
#: copies that only move or re-view memory (a flatten, a channel slice of a split): left on ExecuTorch's
#: kernels they cost a memcpy, not a slow convolution, so they are counted apart from the share
_LAYOUT_OPS = {"aten_view_copy_default", "aten_slice_copy_tensor", "aten_squeeze_copy_dims",
               "aten_squeeze_copy_dim", "aten_unsqueeze_copy_default", "aten_alias_copy_default"}
#: below this share of compute operators in XNNPACK, the .pte's facts carry a warning
MIN_DELEGATED_SHARE = 0.8


def _split_with_sizes_as_slices(x: torch.Tensor, split_sizes: list[int], dim: int = 0) -> list[torch.Tensor]:
    """``torch.split(x, sizes, dim)`` as one ``aten.slice`` per section."""
    sections, start = [], 0
    for size in split_sizes:
        sections.append(torch.ops.aten.slice.Tensor(x, dim, start, start + size))
        start += size
    return sections


def _split_as_slices(x: torch.Tensor, split_size: int, dim: int = 0) -> list[torch.Tensor]:
    """``torch.split(x, n, dim)`` / ``x.chunk(k, dim)`` as slices (the last section may be shorter)."""
    length = x.shape[dim]
    return _split_with_sizes_as_slices(x, [min(split_size, length - s) for s in range(0, length, split_size)], dim)


def _chunk_as_slices(x: torch.Tensor, chunks: int, dim: int = 0) -> list[torch.Tensor]:
    """``x.chunk(k, dim)`` (torch.export keeps ``chunk`` whole) as slices of ceil(length / k)."""
    return _split_as_slices(x, -(-x.shape[dim] // chunks), dim)


def _adaptive_max_pool2d_as_max_pool2d(x: torch.Tensor, output_size: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``F.adaptive_max_pool2d(x, (oh, ow))`` where the input's H and W are multiples of ``oh`` and ``ow``
    (a global max pool, ``output_size`` 1, is the common case): exactly a ``max_pool2d`` with kernel =
    stride = (H / oh, W / ow). ``aten.adaptive_max_pool2d`` is not in the Core ATen opset, so ExecuTorch's
    edge dialect refuses it (``SpecViolationError``); ``max_pool2d_with_indices`` is, and XNNPACK runs it.
    Other sizes (uneven windows) are left to fail with that error."""
    height, width = x.shape[-2], x.shape[-1]
    out_h, out_w = (output_size[0], output_size[-1])
    if height % out_h or width % out_w:
        return NotImplemented
    kernel = [height // out_h, width // out_w]
    return torch.ops.aten.max_pool2d_with_indices.default(x, kernel, kernel)


#: a decomposition table for ``ExportedProgram.run_decompositions``: only these operators, everything else
#: kept. The splits resize with the batch as slices; the adaptive max pool becomes a Core ATen operator.
_EXPORT_DECOMPOSITIONS = {torch.ops.aten.split_with_sizes.default: _split_with_sizes_as_slices,
                     torch.ops.aten.split.Tensor: _split_as_slices,
                     torch.ops.aten.unsafe_split_with_sizes.default: _split_with_sizes_as_slices,
                     torch.ops.aten.unsafe_split.Tensor: _split_as_slices,
                     torch.ops.aten.chunk.default: _chunk_as_slices,
                     torch.ops.aten.unsafe_chunk.default: _chunk_as_slices,
                     torch.ops.aten.adaptive_max_pool2d.default: _adaptive_max_pool2d_as_max_pool2d}


@contextlib.contextmanager
def _keep_batch_range() -> Iterator[None]:
    with torch.backends.mkldnn.flags(enabled=False), torch.backends.nnpack.flags(enabled=False):
        yield


def _require_executorch() -> None:
    import importlib.util

    if importlib.util.find_spec("executorch") is None:
        raise RuntimeUnavailableError("ExecuTorch export needs the executorch package: pip install 'edgekd[mobile]'")


def delegation_facts(graph_module: torch.fx.GraphModule) -> dict[str, Any]:
    """How many compute nodes went to XNNPACK, and which operators stayed on ExecuTorch's CPU kernels.

    ``delegated_share`` = delegated / (delegated + non-delegated) compute nodes; views, slices and
    squeezes (``_LAYOUT_OPS``) are counted apart in ``layout_ops``."""
    from executorch.devtools.backend_debug import get_delegation_info

    info = get_delegation_info(graph_module)
    delegated: Counter[str] = Counter()
    kept: Counter[str] = Counter()
    layout: Counter[str] = Counter()
    for op, row in info.delegation_by_operator.items():
        if op in _BOOKKEEPING_OPS:
            continue
        if op in _LAYOUT_OPS:
            layout[op] += row.delegated + row.non_delegated
            continue
        if row.delegated:
            delegated[op] += row.delegated
        if row.non_delegated:
            kept[op] += row.non_delegated
    total = sum(delegated.values()) + sum(kept.values())
    share = round(sum(delegated.values()) / total, 4) if total else None
    facts: dict[str, Any] = {
        "backend": "XnnpackBackend",
        "delegated_subgraphs": info.num_delegated_subgraphs,
        "delegated_nodes": sum(delegated.values()),
        "non_delegated_nodes": sum(kept.values()),
        "delegated_share": share,
        "delegated_ops": dict(sorted(delegated.items())),
        "non_delegated_ops": dict(sorted(kept.items())),
        "layout_ops": dict(sorted(layout.items())),  # not in the share, delegated or not
        "warnings": [],
    }
    if share is not None and share < MIN_DELEGATED_SHARE:
        outside = ", ".join(f"{op} x{n}" for op, n in kept.most_common(6))
        if len(kept) > 6:  # the counts shown must add up to the total said, or say what is left out
            outside += f" and {len(kept) - 6} more kind(s), {sum(kept.values()) - sum(n for _, n in kept.most_common(6))} node(s)"
        facts["warnings"].append(
            f"only {100 * share:.0f}% of the .pte's compute operators run in XNNPACK ({sum(kept.values())} of "
            f"{total} stay on ExecuTorch's portable CPU kernels: {outside}); expect it to run much slower than "
            "the same model on ONNX Runtime")
    return facts


def _where(node: torch.fx.Node) -> str:
    """``file.py:LINE (`code`)`` of the user's line that made ``node``, from its recorded stack trace."""
    import re

    trace = node.meta.get("stack_trace") or ""
    found = re.findall(r'File "([^"]+)", line (\d+), in \w+\n\s*(.*)', trace)
    if not found:
        return ""
    file, line, code = found[-1]
    return f" at {Path(file).name}:{line}: `{code.strip()}`"


def complex_operators(graph_module: torch.fx.GraphModule) -> list[str]:
    """Operators of an exported graph that produce complex tensors (``aten._fft_r2c`` for
    ``torch.fft.rfft``), each with the user's source line."""
    found = []
    for node in graph_module.graph.nodes:
        val = node.meta.get("val")
        if node.op == "call_function" and isinstance(val, torch.Tensor) and val.dtype.is_complex:
            found.append(f"{node.target} gives {str(val.dtype).removeprefix('torch.')}{_where(node)}")
    return found


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
            raise StageError(f"torch.export could not capture the model for ExecuTorch: {whole_cause(exc)}",
                             hint="make the model traceable (no data-dependent Python control flow)") from exc
        if any(node.target in _EXPORT_DECOMPOSITIONS for node in program.graph.nodes):
            program = program.run_decompositions(_EXPORT_DECOMPOSITIONS)
        try:
            edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
            facts = delegation_facts(edge.exported_program().graph_module)
            buffer = edge.to_executorch().buffer
        except Exception as exc:  # lowering raises plain Exceptions from passes and the serializer
            complex_ops = complex_operators(program.graph_module)
            if complex_ops:
                raise StageError(
                    "not supported by ExecuTorch: complex tensors (" + "; ".join(complex_ops)
                    + f"). Lowering failed with {whole_cause(exc)}",
                    hint="compute the feature outside the model (before the input), or drop pte from "
                    "export.formats; ONNX and .ort are unaffected") from exc
            raise StageError(f"ExecuTorch lowering to XNNPACK failed: {whole_cause(exc)}",
                             hint="drop pte from export.formats, or replace the operator named above") from exc
    atomic_write_bytes(path, buffer)
    return {"exporter": "torch.export + executorch.exir.to_edge_transform_and_lower",
            "file_bytes": path.stat().st_size, "dynamic_batch": dynamic,
            "max_batch": max_batch if dynamic else 1, **facts}
