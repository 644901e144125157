"""The backend's options: one flat, validated dict parsed once into :class:`AdafuseOptions`."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

__all__ = ["AdafuseOptions", "INNER_COMPILERS"]

INNER_COMPILERS = ("inductor", "eager", "aot_eager")
LOWERINGS = ("auto", "op", "decomposed")
STRATEGIES = ("auto", "fused", "merge")
PREGATES = ("exact", "approximate")
GUARDS = ("full", "module-tags")


@dataclasses.dataclass(frozen=True)
class AdafuseOptions:
    """Options of ``torch.compile(model, backend="adafuse", options={...})``.

    Attributes:
        inner: compiler for the graph after the adafuse passes: ``"inductor"`` (default),
            ``"eager"`` (run the rewritten FX graph as is; cheap, for tests) or ``"aot_eager"``.
        strict: if a pass (or anything else of adafuse's) raises, raise instead of warning and
            compiling the unrewritten graph.
        freeze: the weights are constants (Inductor's freezing contract): values computed from
            them (folded static LoRA, stacked per-expert lists, stacked routers, merged copies)
            are computed once and cached, refreshed when a parameter is replaced or updated
            through autograd-visible ops (``copy_``, ``load_state_dict``: new version), but NOT
            after writes through ``.data`` (``p.data.copy_``, PEFT's ``hotswap_adapter``): call
            :func:`adafuse_compile.refresh` after those. Default ``False``: the rewritten graph
            reads every weight at every call, as plain ``torch.compile`` does, so no update is
            ever missed; folding and merging need ``freeze=True``.
        fold: with ``freeze=True``, fold static LoRA sites (one adapter, no router) into their
            base weight (:class:`adafuse_compile.passes.FoldStaticLoRAPass`); without it they
            are fused like any other site.
        fuse: rewrite each verified MoLE site into one ``adafuse::lora_moe_linear`` call
            (:class:`adafuse_compile.passes.FuseMoLEPass`).
        lowering: what a fused site becomes: ``"op"`` (the custom op: C++ kernel on CPU, Triton
            on CUDA; on CPU a site's own top-k router moves into it too,
            :class:`adafuse_compile.passes.RouteIntoSitesPass`), ``"decomposed"`` (the gathered
            form in plain torch ops, for Inductor to fuse), or ``"auto"`` (default): the op,
            except for Inductor on a CPU where the C++ kernels cannot be built. Small model,
            decode, ratio to the backbone, decomposed vs op: 1.20 vs 1.17 (stacked, batch 1),
            1.69 vs 1.44 (MoLA style, batch 8).
        hoist: routers of sites that read the same tensor (q/k/v; gate/up) run as one batched
            matmul on stacked weights (:class:`adafuse_compile.passes.HoistRoutersPass`), in
            graphs with a static token count only, where the batched matmul was checked to give
            bitwise the separate linears' logits at that count.
        strategy: for sites grouped under one decision per token (pre-gated models):
            ``"fused"`` (default) runs the fused unmerged op at each site; ``"merge"`` merges the
            chosen experts of the whole group into copies of the weights whenever one decision
            covers the step and runs plain linears; ``"auto"`` lets the cost model
            (:mod:`adafuse_compile.runtime.cost_model`) choose per step from the token count and the
            observed rate of decision changes. ``"fused"`` is the default because the run-time
            choice itself costs two Python-dispatched ops per site: measured on the small model,
            batch-1 decode, 1.09x the backbone under ``"auto"`` vs 1.03x fused, and even with a
            decision that never changes merged steps are 1.08x fused at T=1; merging wins for
            long steps under one decision (T=256: 0.83x fused, break-even near T=32).
            ``"merge"`` and ``"auto"`` cache merged weights, so they need ``freeze=True``.
        pregate: ``"exact"`` (default) only rewrites what is provably equal; ``"approximate"``
            fits one token-level gate to every router of a per-layer-routed model (changes the
            model; reports routing agreement and output deviation).
        cpp_wrapper: compile CPU graphs with fused sites using Inductor's C++ wrapper (no
            Python per extern call; default). Decode steps 7-15% faster on the small model, and
            the medium model with stacked experts at 1.08x the backbone against 1.18x; its C++
            costs compile time (medium models, cold: MoLA 66 s against 25 s without it and 54 s
            for plain Inductor; stacked 23 s against Inductor's 25 s). ``False``: Inductor's
            Python wrapper.
        guards: ``"full"`` (default): Dynamo's guards as they are. ``"module-tags"``: Dynamo
            skips the guards of module subtrees whose dicts are unchanged, with what that would
            miss covered (:mod:`adafuse_compile.runtime.module_guards`); a module whose
            ``__class__`` is reassigned then raises :class:`adafuse_compile.ClassChangedError`
            once, and the next call recompiles. Only through :func:`adafuse_compile.compile`,
            which installs the guard filter this needs.
    """

    inner: str = "inductor"
    strict: bool = False
    freeze: bool = False
    fold: bool = True
    fuse: bool = True
    lowering: str = "auto"
    hoist: bool = True
    strategy: str = "fused"
    pregate: str = "exact"
    cpp_wrapper: bool = True
    guards: str = "full"

    def __post_init__(self) -> None:
        if self.inner not in INNER_COMPILERS:
            raise ValueError(f"option 'inner' must be one of {INNER_COMPILERS}, got {self.inner!r}")
        if self.lowering not in LOWERINGS:
            raise ValueError(f"option 'lowering' must be one of {LOWERINGS}, got {self.lowering!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"option 'strategy' must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.strategy != "fused" and not self.freeze:
            raise ValueError(f"strategy={self.strategy!r} merges experts into cached copies of the weights, which "
                             "would miss writes through .data; pass freeze=True as well (and call "
                             "adafuse_compile.refresh() after such writes)")
        if self.pregate not in PREGATES:
            raise ValueError(f"option 'pregate' must be one of {PREGATES}, got {self.pregate!r}")
        if self.guards not in GUARDS:
            raise ValueError(f"option 'guards' must be one of {GUARDS}, got {self.guards!r}")

    @classmethod
    def from_dict(cls, options: Mapping[str, Any] | None) -> "AdafuseOptions":
        """Parse user options; unknown keys and wrong types raise ``ValueError`` naming the valid ones."""
        if options is None:
            return cls()
        if isinstance(options, cls):
            return options
        if not isinstance(options, Mapping):
            raise ValueError(f"adafuse options must be a dict, got {type(options).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - set(fields))
        if unknown:
            valid = ", ".join(f"{n} ({fields[n].type})" for n in fields)
            raise ValueError(f"unknown adafuse option(s) {unknown}; valid options: {valid}")
        for name, value in options.items():
            expected = type(getattr(cls(), name))
            if type(value) is not expected:
                raise ValueError(
                    f"adafuse option {name!r} must be {expected.__name__}, got {type(value).__name__}"
                )
        return cls(**options)
