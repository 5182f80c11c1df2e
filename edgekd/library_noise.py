"""Known-harmless messages of third-party libraries, kept off the terminal (``edgekd --debug`` shows them).

Each filter matches one library's logger or warning *and* its message, never a whole library, so
anything else those libraries say still reaches the user. Measured on this project's machines
(torch 2.13 CPU, torchao from ExecuTorch 1.x, transformers, torch-pruning):

- torchao, imported by transformers and by ExecuTorch's quantizer, logs "Failed to load
  .../torchao/_C_mxfp8...so" and "..._C_cutlass_90a.abi3.so": CUDA kernels that a CPU build of
  torch cannot load and edgekd never calls.
- torch's ``torch.utils._pytree`` logs "<enum 'KernelPreference'> is an Enum subclass and is now
  natively supported by torch.compile ..." when torchao registers its enums: a deprecation notice
  addressed to torchao.
- torch warns "TF32 acceleration on top of oneDNN is available for Intel GPUs ..." when the
  ExecuTorch quantizer's capture switches oneDNN off (``torch.backends.mkldnn.flags``); CPU only.
- torch-pruning warns "Unwrapped parameters detected: [...]" for a model with bare ``nn.Parameter``
  tensors (a class token, a layer-scale vector); edgekd's prune stage decides itself which
  dimension of those it may prune and says so in the prune report.
"""

from __future__ import annotations

import logging
import re
import warnings

#: (logger name, message pattern) of the log records dropped
LOG_NOISE: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("torchao", re.compile(r"^Failed to load .*torchao[/\\]_C\w*\.\S*so\b")),
    ("torch.utils._pytree", re.compile(r"is an Enum subclass and is now natively supported by torch\.compile")),
)
#: (warning category, message regex, module regex) of the Python warnings ignored
WARNING_NOISE: tuple[tuple[type[Warning], str, str], ...] = (
    (UserWarning, r"TF32 acceleration on top of oneDNN is available for Intel GPUs", ""),
    (UserWarning, r"Unwrapped parameters detected", r"torch_pruning(\.|$)"),
)


class _DropMatching(logging.Filter):
    def __init__(self, pattern: re.Pattern[str]) -> None:
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            return not self.pattern.search(record.getMessage())
        except Exception:  # a record whose arguments do not format: let it through, the library's problem
            return True


_installed: list[tuple[logging.Logger, logging.Filter]] = []


def quiet_known_library_noise() -> None:
    """Install the filters (once per process). Loggers are configured by name, so this works before the
    libraries are imported; call it before anything imports torchao or transformers."""
    if _installed:
        return
    for name, pattern in LOG_NOISE:
        logger, drop = logging.getLogger(name), _DropMatching(pattern)
        logger.addFilter(drop)
        _installed.append((logger, drop))
    for category, message, module in WARNING_NOISE:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)

