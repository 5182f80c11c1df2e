"""Shared weights stored as an index and a codebook in the ONNX graph (the ``cluster`` stage's payoff on disk).

A clustered layer (``edgekd.cluster``, Deep Compression's weight sharing, Han et al. 2016) holds at most k
distinct float32 values. The plain ONNX export still stores every weight as 4 bytes, so the sharing only shows
once the file is gzipped. This module writes a second file in which every float initializer with at most 256
distinct values (and at least ``min_elements`` elements) becomes

    index (uint8, the weight's shape) -> Cast(int32) -> Gather(codebook (float32, k), axis 0) -> the weight

and one with at most 256 per output channel (a clustered conv with its BatchNorm folded in: each channel's k
values scaled by its own factor) becomes index (uint8, channels x rest) -> Cast -> GatherElements(codebooks
(float32, channels x k), axis 1) -> Reshape -> the weight, so the file on disk holds one byte per weight
instead of four. Each Gather reads constants only, so ONNX
Runtime folds it at session creation (graph optimization level basic and above): the session then runs the
same float kernels with the same weights as the plain file. It saves storage and download, not RAM or latency.
A 4-bit index (ONNX's ``UINT4``, opset 21) would halve the index again; it is not used because ONNX Runtime's
CPU provider does not run Cast or Gather on 4-bit tensors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgekd.fileio import atomic_write_bytes

#: the file written beside ``<role>.onnx``
CODEBOOK_SUFFIX = ".codebook.onnx"
#: the largest codebook a uint8 index can address
MAX_VALUES = 256
#: smaller initializers (biases, norms) gain nothing from an index and a codebook
MIN_ELEMENTS = 256


def _rows(array: np.ndarray) -> np.ndarray:
    """``array`` as (output channels, the rest): axis 0 of a Conv/Gemm weight."""
    return array.reshape(array.shape[0], -1)


def codebook_kind(array: np.ndarray) -> str | None:
    """How ``array`` is stored as index + codebook, or None when it is not worth it:

    - ``"tensor"``: at most ``MAX_VALUES`` distinct values in the whole tensor (a layer clustered and
      exported as it is);
    - ``"row"``: at most ``MAX_VALUES`` per output channel (axis 0), the codebooks of all channels taking at
      most a quarter of the float bytes. Exporting folds each BatchNorm into the conv before it, scaling
      every output channel of a clustered weight by its own factor: the k shared values become k per channel
      (a clustered conv with 16 values read 476-983 distinct values in its ONNX file)."""
    if np.unique(array).size <= MAX_VALUES:
        return "tensor"
    if array.ndim < 2:
        return None
    rows = _rows(array)
    widest = max(np.unique(row).size for row in rows)
    if widest > MAX_VALUES or 4 * rows.shape[0] * widest > rows.size:
        return None
    return "row"


def shared_initializers(model: onnx.ModelProto, *,
                        min_elements: int = MIN_ELEMENTS) -> dict[str, tuple[np.ndarray, str]]:
    """Name -> (array, ``codebook_kind``) of every float32 initializer of ``model``'s main graph with at least
    ``min_elements`` elements that is stored as index + codebook."""
    found = {}
    for init in model.graph.initializer:
        if init.data_type != TensorProto.FLOAT or np.prod(init.dims, dtype=np.int64) < min_elements:
            continue
        array = numpy_helper.to_array(init)
        kind = codebook_kind(array)
        if kind is not None:
            found[init.name] = (array, kind)
    return found


def _encode(name: str, array: np.ndarray, kind: str) -> tuple[list[onnx.TensorProto], list[onnx.NodeProto]]:
    """The initializers and nodes that compute ``array`` under ``name`` from a uint8 index and codebook(s)."""
    index_i32 = f"{name}__index_i32"
    cast = helper.make_node("Cast", [f"{name}__index"], [index_i32], to=TensorProto.INT32, name=f"{name}__cast")
    if kind == "tensor":
        codebook, index = np.unique(array, return_inverse=True)
        inits = [numpy_helper.from_array(index.reshape(array.shape).astype(np.uint8), f"{name}__index"),
                 numpy_helper.from_array(codebook.astype(np.float32), f"{name}__codebook")]
        gather = helper.make_node("Gather", [f"{name}__codebook", index_i32], [name], axis=0, name=f"{name}__gather")
        return inits, [cast, gather]
    rows = _rows(array)
    per_row = [np.unique(row, return_inverse=True) for row in rows]
    width = max(values.size for values, _ in per_row)
    # a row with fewer values repeats its last one: those entries are never indexed
    codebooks = np.stack([np.pad(values, (0, width - values.size), mode="edge") for values, _ in per_row])
    index = np.stack([inverse for _, inverse in per_row]).astype(np.uint8)
    inits = [numpy_helper.from_array(index, f"{name}__index"),
             numpy_helper.from_array(codebooks.astype(np.float32), f"{name}__codebook"),
             numpy_helper.from_array(np.asarray(array.shape, dtype=np.int64), f"{name}__shape")]
    nodes = [cast,
             helper.make_node("GatherElements", [f"{name}__codebook", index_i32], [f"{name}__rows"], axis=1,
                              name=f"{name}__gather"),
             helper.make_node("Reshape", [f"{name}__rows", f"{name}__shape"], [name], name=f"{name}__reshape")]
    return inits, nodes


def to_codebook_graph(model: onnx.ModelProto, shared: dict[str, tuple[np.ndarray, str]]) -> onnx.ModelProto:
    """A copy of ``model`` in which each initializer named in ``shared`` is a uint8 index plus float32
    codebook(s) joined by Cast and Gather (per tensor) or GatherElements and Reshape (per output channel)
    nodes that produce a tensor of the original name, shape and values."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    kept = [init for init in graph.initializer if init.name not in shared]
    nodes = []
    for name, (array, kind) in shared.items():
        inits, made = _encode(name, array, kind)
        kept.extend(inits)
        nodes.extend(made)
    del graph.initializer[:]
    graph.initializer.extend(kept)
    # the weights are computed before any node that reads them
    rest = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + rest)
    # an initializer listed as a graph input (older exporters) is now a node's output
    inputs = [i for i in graph.input if i.name not in shared]
    del graph.input[:]
    graph.input.extend(inputs)
    return out


def write_codebook_onnx(source: Path, target: Path, *, min_elements: int = MIN_ELEMENTS) -> dict[str, Any] | None:
    """Write ``source`` (a plain ONNX file) as ``target`` with its shared weights as index + codebook, checked
    to compute the same outputs in ONNX Runtime on a random input; None (and nothing written) when no
    initializer has at most 256 distinct values. Returns the facts for the export summary: bytes of both
    files and the count of layers stored so. Raises ``ValueError`` when the rewritten graph disagrees."""
    model = onnx.load(str(source))
    shared = shared_initializers(model, min_elements=min_elements)
    if not shared:
        return None
    rewritten = to_codebook_graph(model, shared)
    onnx.checker.check_model(rewritten)
    payload = rewritten.SerializeToString()
    _check_same_outputs(model.SerializeToString(), payload, model)
    atomic_write_bytes(target, payload)
    return {"codebook_file": target.name, "codebook_layers": len(shared), "codebook_bytes": len(payload),
            "float_bytes": source.stat().st_size}


def _check_same_outputs(plain: bytes, rewritten: bytes, model: onnx.ModelProto) -> None:
    import onnxruntime as ort  # imported here: loading a recipe imports no runtime

    feeds = {}
    rng = np.random.default_rng(0)
    initializers = {init.name for init in model.graph.initializer}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor = value.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 2 for d in tensor.shape.dim]
        dtype = helper.tensor_dtype_to_np_dtype(tensor.elem_type)
        feeds[value.name] = rng.standard_normal(shape).astype(dtype)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    runs = [ort.InferenceSession(blob, options, providers=["CPUExecutionProvider"]).run(None, feeds)
            for blob in (plain, rewritten)]
    for a, b in zip(*runs, strict=True):
        if not np.allclose(a, b, rtol=1e-5, atol=1e-6):
            raise ValueError(f"the index + codebook graph disagrees with the plain one by up to "
                             f"{float(np.max(np.abs(a - b))):.3g}")
