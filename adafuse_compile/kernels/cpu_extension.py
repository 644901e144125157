"""Builds and loads the C++ CPU kernels (``csrc/*.cpp``) once, on first use.

The kernels register themselves for the CPU dispatch key of ``adafuse::*`` ops, taking over from
the pure-torch implementations (which stay as the portable fallback). Building takes ~40 s on 2
cores the first time and is cached by torch in ``~/.cache/torch_extensions`` (or
``$TORCH_EXTENSIONS_DIR``). ``ADAFUSE_CPU_KERNELS=0`` disables them; a failed build logs a
warning once and leaves the pure-torch path in place.
"""

from __future__ import annotations

import functools
import logging
import os
import pathlib

log = logging.getLogger("adafuse_compile")

_SOURCES = ["lora_moe_linear_cpu.cpp"]
_ENV = "ADAFUSE_CPU_KERNELS"


@functools.cache
def load_cpu_kernels() -> bool:
    """Build (first time) and load the CPU kernels; ``True`` when they are registered."""
    if os.environ.get(_ENV, "1") == "0":
        log.info("adafuse CPU kernels disabled by %s=0; using the pure-torch path", _ENV)
        return False
    from torch.utils import cpp_extension

    csrc = pathlib.Path(__file__).parent / "csrc"
    name = "adafuse_cpu_kernels"
    try:
        build_dir = pathlib.Path(cpp_extension._get_build_directory(name, verbose=False))
        cached = any(build_dir.glob("*.so"))
    except Exception:
        cached = False
    if not cached:  # a silent 20-40 s stall would look like a hang: say it once
        log.warning("adafuse: building the C++ CPU kernels (first use only, ~20-40 s; then cached)")
    try:
        cpp_extension.load(
            name=name,
            sources=[str(csrc / s) for s in _SOURCES],
            extra_cflags=["-O3"],
            is_python_module=False,
            verbose=False,
        )
    except Exception as e:  # no compiler, no headers, ...: stay correct, just slower
        log.warning("adafuse: building the C++ CPU kernels failed (%s); using the pure-torch path", e)
        return False
    return True
