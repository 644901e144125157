"""Builds and loads the C++ CPU kernels (``csrc/*.cpp``) once, on first use.

The kernels register themselves for the CPU dispatch key of ``adafuse::*`` ops, taking over from
the pure-torch implementations (which stay as the portable fallback). Building takes ~40 s on 2
cores the first time and is cached by torch in ``~/.cache/torch_extensions`` (or
``$TORCH_EXTENSIONS_DIR``). ``ADAFUSE_CPU_KERNELS=0`` disables them; a failed build logs a
warning once and leaves the pure-torch path in place.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import pathlib
import platform

log = logging.getLogger("adafuse_compile")

_SOURCES = ["lora_moe_linear_cpu.cpp"]
_ENV = "ADAFUSE_CPU_KERNELS"
# The first that builds. -fopenmp: at::parallel_for is a serial loop in code compiled without it
# (ATen/ParallelOpenMP.h). The libgomp.so.1 it links resolves, at load, to the one torch has
# already loaded (same soname; checked in /proc/self/maps): one OpenMP thread pool, torch's.
_FLAGS = (["-O3", "-march=native", "-fopenmp"], ["-O3", "-fopenmp"], ["-O3"])


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
        build_dir = pathlib.Path(cpp_extension._get_build_directory(f"{name}_{_tag(_FLAGS[0])}", verbose=False))
        cached = any(build_dir.glob("*.so"))
    except Exception:
        cached = False
    if not cached:  # a silent 20-40 s stall would look like a hang: say it once
        log.warning("adafuse: building the C++ CPU kernels (first use only, ~20-40 s; then cached)")
    # -march=native: the expert loops vectorize with this machine's widest units (AVX-512 on the
    # 2-core Xeon: a decode token's adapter of the small model, 512x1376, r=8, k=2, took 9.4 us
    # over the base linear with the SSE2 baseline). The build is cached per machine (``_tag``),
    # so a cache directory shared between machines never loads another CPU's code.
    for flags in _FLAGS:
        try:
            cpp_extension.load(
                name=f"{name}_{_tag(flags)}",
                sources=[str(csrc / s) for s in _SOURCES],
                extra_cflags=flags,
                extra_ldflags=[f for f in flags if f == "-fopenmp"],
                is_python_module=False,
                verbose=False,
            )
            return True
        except Exception as e:  # no compiler, no headers, an unknown flag...: stay correct, just slower
            log.warning("adafuse: building the C++ CPU kernels with %s failed: %s", " ".join(flags),
                        str(e).splitlines()[0][:200])
            log.debug("adafuse: the build's output", exc_info=True)
    log.warning("adafuse: using the pure-torch path for the CPU kernels")
    return False


def _tag(flags: list[str]) -> str:
    """A short name for the CPU the flags target: ``-march=native`` code runs only on its CPU."""
    if "-march=native" not in flags:
        return "generic"
    try:
        info = pathlib.Path("/proc/cpuinfo").read_text()
        cpu = next((ln for ln in info.splitlines() if ln.startswith(("flags", "Features"))), "")
    except OSError:
        cpu = platform.processor() or platform.machine()
    return "native" + hashlib.sha1(cpu.encode()).hexdigest()[:8]
