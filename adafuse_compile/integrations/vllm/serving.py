"""What the backend needs from vLLM, and what it tells back, in each worker process.

vLLM calls the backend by name (``torch.compile(..., backend="adafuse")``) and passes it no
options of ours, and by then ``additional_config`` can no longer be read (the config context is
gone). The model can read it: vLLM hands it the whole config when it builds it. So the model
parses ``additional_config["adafuse"]`` into :class:`ServingSettings` at construction (bad
options fail the engine's start, not a later compile), and wraps its first forward, the one
that compiles, in :class:`FirstCompile`: the options reach the backend through
:func:`adafuse_compile.backend.ambient_options`, and the backend's rewrites are collected with
:func:`adafuse_compile.backend.capture_rewrites` and reported per tensor-parallel rank (log, and
a JSON file per rank with ``report_dir``).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import pathlib
import re
from typing import Any

import torch

from ...backend import ambient_options, capture_rewrites
from ...explain import ExplainReport
from ...options import AdafuseOptions
from ...passes import graph_ops

log = logging.getLogger("adafuse_compile")

__all__ = ["FirstCompile", "ServingSettings", "first_compile", "report_path"]

SETTINGS_KEY = "adafuse"
"""The key of ``additional_config`` that holds our settings."""


def report_path(report_dir: str | os.PathLike, rank: int) -> str:
    """Where tensor-parallel rank ``rank`` writes its report."""
    return os.path.join(os.fspath(report_dir), f"adafuse_rank{rank}.json")


@dataclasses.dataclass(frozen=True)
class ServingSettings:
    """``additional_config={"adafuse": {...}}``: the backend's options (the keys of
    :class:`adafuse_compile.AdafuseOptions`, checked the same way: unknown keys raise) plus
    ``report_dir``, a directory where each tensor-parallel rank writes what the backend did to
    its graph (``adafuse_rank{R}.json``)."""

    options: AdafuseOptions
    report_dir: str | None
    backend: str
    rank: int
    world_size: int

    @classmethod
    def from_vllm_config(cls, vllm_config: Any) -> "ServingSettings":
        from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

        extra = vllm_config.additional_config
        raw = dict(extra.get(SETTINGS_KEY) or {}) if isinstance(extra, dict) else {}
        report_dir = raw.pop("report_dir", None)
        if report_dir is not None and not isinstance(report_dir, str):
            raise ValueError(f"additional_config['adafuse']['report_dir'] must be a str, got {type(report_dir).__name__}")
        # Inductor's C++ wrapper cannot call vLLM's attention op (its layer-name argument is a
        # Python object: "arg type PyObject is not yet supported by custom_op_wrapper"), so on
        # vLLM graphs it only costs a failed build before the Python wrapper; off unless asked.
        raw.setdefault("cpp_wrapper", False)
        try:
            options = AdafuseOptions.from_dict(raw)
        except ValueError as e:
            raise ValueError(f"additional_config['adafuse']: {e} (besides them: report_dir)") from None
        backend = str(vllm_config.compilation_config.backend)
        if backend == "adafuse" and _aot_compile_on():
            _check_aot_compatible(options)
        return cls(options, report_dir, backend, get_tensor_model_parallel_rank(),
                   get_tensor_model_parallel_world_size())


def _aot_compile_on() -> bool:
    import vllm.envs as envs

    return bool(envs.VLLM_USE_AOT_COMPILE)


def _check_aot_compatible(options: AdafuseOptions) -> None:
    """Refuse, at the engine's start, options whose compiled graphs vLLM's AOT compile cannot
    store correctly: derived inputs (``freeze=True``) make the backend's result a Python
    closure that AOT compile cannot serialize (the engine then fails or hangs), merge groups
    (``strategy`` ``"merge"``/``"auto"``) reach per-process state by an id no artifact may
    keep, and ``inner`` other than Inductor returns no serializable function."""
    bad = []
    if options.freeze:
        bad.append("freeze=True")
    if options.strategy != "fused":
        bad.append(f"strategy={options.strategy!r}")
    if options.inner != "inductor":
        bad.append(f"inner={options.inner!r}")
    if bad:
        raise ValueError(f"additional_config['adafuse']: {', '.join(bad)} cannot be stored by vLLM's AOT compile "
                         "(the compiled function holds process state or is not serializable); run with "
                         "VLLM_USE_AOT_COMPILE=0 or VLLM_DISABLE_COMPILE_CACHE=1, or drop these options")


# The functions of graph_ops that hold no state: a graph calling them computes the same thing
# wherever and whenever it runs, given the same graph (group_decision / group_site reach a merge
# group of this process by id, so they are not among them).
_STATELESS_GRAPH_OPS = ("canonical_A", "canonical_B", "dispatch_rows", "empty_linear_output", "expert_linear",
                        "rows_where", "fused_site", "hoisted_logits", "routed_site", "router_logits", "site_operands")


@functools.cache
def _source_hash() -> str:
    """A hash of adafuse_compile's code (Python and C++) and torch's version: what a cached
    compiled graph calling our functions depends on besides the graph itself."""
    h = hashlib.sha256(torch.__version__.encode())
    root = pathlib.Path(__file__).resolve().parents[2]
    for path in sorted(p for p in root.rglob("*") if p.suffix in (".py", ".cpp")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:32]


def cacheable_graph_ops() -> dict[str, str]:
    """``torch._inductor.config.unsafe_marked_cacheable_functions`` entries for the stateless
    functions rewritten graphs call, keyed by our code's hash.

    Why (the wrong tokens of issue 15): AOTAutograd's cache refuses graphs calling functions it
    does not know ("Unsupported call_function target ...graph_ops.routed_site"). Under vLLM's
    AOT compile (``bypass_autograd_cache_key``) torch then keys the graph by a "nonce",
    ``str(random.random())``; vLLM seeds Python's ``random`` identically in every worker, so the
    nonce is the same on every tensor-parallel rank and in every run. Both ranks stored their
    graphs (which differ: each embeds its own vocabulary shard's bounds) under one key, and a
    warm start loaded the other rank's graph: garbage logits on one rank, wrong tokens. With
    our functions marked, the key is computed from the graph, as for plain Inductor.
    """
    return {f"{graph_ops.__name__}.{name}": _source_hash() for name in _STATELESS_GRAPH_OPS}


class FirstCompile:
    """The context of the model's first forward: options in, rewrites out (see module doc).

    ``done`` is set after one call, whether the backend ran or not: vLLM compiles on the first
    call, so a first call without a rewrite means the graph did not go through the backend
    (another backend, or a compiled function vLLM loaded from its cache), which is reported.
    """

    def __init__(self, settings: ServingSettings, expected_sites: int) -> None:
        self.settings = settings
        self.expected_sites = expected_sites
        self.done = False
        self._stack: list = []

    def __enter__(self) -> "FirstCompile":
        marked = {**torch._inductor.config.unsafe_marked_cacheable_functions, **cacheable_graph_ops()}
        managers = [torch._inductor.config.patch(unsafe_marked_cacheable_functions=marked),
                    ambient_options(self.settings.options), capture_rewrites()]
        entered = []
        try:
            for cm in managers:
                self._rewrites = cm.__enter__()
                entered.append(cm)
        except BaseException:
            for cm in reversed(entered):
                cm.__exit__(None, None, None)
            raise
        self._stack = list(reversed(entered))
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        for cm in self._stack:
            cm.__exit__(exc_type, exc, tb)
        self._stack = []
        if exc_type is None:
            self.done = True
            self._report(list(self._rewrites))

    def _report(self, rewrites: list) -> None:
        s = self.settings
        sites = [site for rw in rewrites for site in rw.sites]
        report = ExplainReport(sites, len(rewrites), 0, [], [g for rw in rewrites for g in rw.groups],
                               [h for rw in rewrites for h in rw.hoisted])
        fused = report.count("fused")
        errors = [rw.error for rw in rewrites if rw.error]
        if not rewrites:
            log.warning("adafuse (vLLM rank %d/%d): the first forward did not run the adafuse backend (backend %r%s); "
                        "the model runs as compiled before, not rewritten here", s.rank, s.world_size, s.backend,
                        ", a compiled function loaded from vLLM's cache?" if s.backend == "adafuse" else "")
        elif fused < self.expected_sites:
            log.warning("adafuse (vLLM rank %d/%d): %d of the model's %d adapter sites fused\n%s", s.rank,
                        s.world_size, fused, self.expected_sites, report)
        else:
            log.info("adafuse (vLLM rank %d/%d): %d of %d adapter sites fused\n%s", s.rank, s.world_size, fused,
                     self.expected_sites, report)
        if s.report_dir is None:
            return
        os.makedirs(s.report_dir, exist_ok=True)
        data = {
            "rank": s.rank, "world_size": s.world_size, "backend": s.backend, "backend_ran": bool(rewrites),
            "options": dataclasses.asdict(s.options), "expected_sites": self.expected_sites,
            "graphs": len(rewrites), "counts": {st: report.count(st) for st in ("fused", "folded", "left")},
            "sites": [{"path": module_path(x.path), "status": x.status, "reason": x.reason} for x in sites],
            "groups": len(report.groups), "errors": errors, "explain": str(report),
        }
        path = report_path(s.report_dir, s.rank)
        with open(path + ".tmp", "w") as f:
            json.dump(data, f, indent=1)
        os.replace(path + ".tmp", path)


def module_path(name: str) -> str:
    """``model.layers.0.self_attn.q_proj`` from the name Dynamo gives the site's weight input
    (``l_self_modules_layers_modules_0_modules_self_attn_modules_q_proj_parameters_weight_``);
    other names are returned as they are."""
    m = re.fullmatch(r"l_self_modules_(.+)_parameters_weight_", name)
    return "model." + ".".join(m.group(1).split("_modules_")) if m else name


def first_compile(settings: ServingSettings, expected_sites: int) -> FirstCompile:
    return FirstCompile(settings, expected_sites)
