"""Keep a native library's start-up chatter off the user's terminal, without hiding its errors.

ExecuTorch's C++ runtime logs at Info level straight to file descriptor 2 when its thread pool is
created or resized ("[cpuinfo_utils.cpp:87] Failed to open midr file ...", "[threadpool.cpp:66]
Resetting threadpool to 1 threads."): a dozen lines that read like failures in the middle of a
run's output. Python's ``sys.stderr`` cannot catch them, so fd 2 is pointed at a temporary file
for the duration of the call; afterwards every captured line that is not known chatter is
written to the real stderr, so a genuine native error still reaches the user.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

#: lines ExecuTorch 1.x prints on every thread-pool creation/resize on x86 (no ARM MIDR registers)
EXECUTORCH_CHATTER = re.compile(r"^\[(cpuinfo_utils|threadpool)\.cpp:\d+\] ")


@contextmanager
def filtered_native_stderr(chatter: re.Pattern[str] = EXECUTORCH_CHATTER,
                           sink: list[str] | None = None) -> Iterator[None]:
    """Capture fd 2 while the block runs; re-emit every line that ``chatter`` does not match, or,
    with ``sink``, append those lines to it instead (the caller puts them into an error message:
    "[tensor_impl.cpp:135] Attempted to resize a static tensor ..." says more than "error 0x10")."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # stderr replaced by an object without a descriptor
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    with tempfile.TemporaryFile(mode="w+b") as capture:
        os.dup2(capture.fileno(), fd)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, fd)
            os.close(saved)
            capture.seek(0)
            text = capture.read().decode("utf-8", errors="replace")
            kept = [line for line in text.splitlines(keepends=True) if not chatter.match(line)]
            if sink is not None:
                sink.extend(line.rstrip("\n") for line in kept)
            elif kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()
