"""``adafuse_compile.compile``: torch.compile with the adafuse backend and the Dynamo settings
that let data-dependent adapter dispatch land in one graph, scoped to this model."""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable

import torch

from .backend import backend_with_mode
from .branches import skip_branches_when_compiling
from .mixed_batches import MixedBatches
from .options import AdafuseOptions
from .runtime.module_guards import SETTINGS as MODULE_TAGS_SETTINGS
from .runtime.module_guards import ModuleTagGuards

__all__ = ["DYNAMO_SETTINGS", "compile", "refresh"]

# Token-dispatch adapters (MixLoRA, MoLA: ``torch.where(mask)`` + ``index_add_``) call nonzero,
# whose output size depends on the data. By default Dynamo breaks the graph there, and a break
# inside the expert loop makes it run the whole forward eagerly (shared/MEASUREMENTS.md: 18 breaks, 68
# fragments per step on an 8-layer model). Capturing such ops gives one graph the passes can
# rewrite: after fusion the nonzero calls are gone.
DYNAMO_SETTINGS = {"capture_dynamic_output_shape_ops": True}


def compile(model: torch.nn.Module, *, in_place: bool = False, dynamic: bool | None = None,
            fullgraph: bool = False, mode: str | None = None, calibration: torch.Tensor | None = None,
            **options: Any) -> torch.nn.Module:
    """``torch.compile(model, backend="adafuse", options=options)``, plus scoped Dynamo settings.

    The settings apply whenever the compiled forward runs (and so whenever Dynamo compiles or
    recompiles it), not globally: other models compiled in the same process are unaffected.
    ``options`` are the backend's (see :class:`adafuse_compile.AdafuseOptions`); they are
    checked here, so a typo raises ``ValueError`` now rather than at the first call.

    ``in_place=True`` compiles ``model.forward`` and sets it on ``model``, which is returned:
    then ``model.generate()`` (transformers), hooks and every other caller of ``model(...)``
    run compiled. The default returns a new wrapper module, whose ``generate`` would call the
    uncompiled forward. ``del model.forward`` undoes ``in_place``.

    ``pregate="approximate"`` (opt-in; it changes the model) first replaces the per-layer
    routers with one fitted token-level gate (:func:`adafuse_compile.approximate_pregate`, on
    the token ids ``calibration`` if given), logs its report and compiles that new model, which
    holds the report as ``adafuse_pregate_report``; ``model`` is left as it was, so ``in_place``
    then applies to the new model, which is returned.

    ``guards="module-tags"`` (opt-in) installs the guard filter and Dynamo settings of
    :mod:`adafuse_compile.runtime.module_guards`: Dynamo skips unchanged module subtrees, which
    models with many parameter tensors (one ``nn.Linear`` per expert) pay for at every call.
    """
    opts = AdafuseOptions.from_dict(options)
    if opts.pregate == "approximate":
        from .pregate import approximate_pregate

        model, report = approximate_pregate(model, calibration)
        model.adafuse_pregate_report = report
        options = {**options, "pregate": "exact"}  # the backend sees the new model's graphs only
    elif calibration is not None:
        raise ValueError("calibration= is only used with pregate='approximate'")
    tags = opts.guards == "module-tags"
    # torch.compile takes the guard filter out of the options before the backend sees them.
    compile_options = {**options, "guard_filter_fn": ModuleTagGuards(model)} if tags else options
    kwargs = dict(backend=backend_with_mode(mode), options=compile_options or None, dynamic=dynamic,
                  fullgraph=fullgraph)
    if in_place:
        model.forward = _with_settings(torch.compile(model.forward, **kwargs), model, tags)
        return model
    compiled = torch.compile(model, **kwargs)
    compiled.forward = _with_settings(compiled.forward, model, tags)
    return compiled


def _with_settings(forward: Callable, model: torch.nn.Module, tags: bool) -> Callable:
    mixed = []  # PEFT LoRA models: the gated path, installed at the first mixed-adapter batch
    branches = []  # expert loops that skip empty experts: traceable copies, installed at the first call
    # guards="module-tags": the filter turns tag skipping on per frame; the patch restores it after.
    settings = {**DYNAMO_SETTINGS, **MODULE_TAGS_SETTINGS} if tags else DYNAMO_SETTINGS
    installed = ModuleTagGuards.installed if tags else contextlib.nullcontext

    @functools.wraps(forward)
    def forward_with_settings(*args, **kwargs):
        if not branches:
            branches.append(skip_branches_when_compiling(model))
        with torch._dynamo.config.patch(settings), installed(), \
                serving_mixed_batch(model, mixed, args, kwargs) as kwargs:
            return forward(*args, **kwargs)

    return forward_with_settings


@contextlib.contextmanager
def serving_mixed_batch(model: torch.nn.Module, cache: list, args, kwargs):
    """``kwargs`` to call ``model`` with: a PEFT ``adapter_names=`` list becomes a gate tensor on
    the LoRA layers for the call (:mod:`adafuse_compile.mixed_batches`); ``cache`` holds the
    model's :class:`~adafuse_compile.mixed_batches.MixedBatches` once made."""
    names = kwargs.get("adapter_names")
    if names is None or not (cache or MixedBatches.applies_to(model)):
        yield kwargs
        return
    if not cache:
        cache.append(MixedBatches(model))
    ids = kwargs.get("input_ids", kwargs.get("inputs_embeds", args[0] if args else None))
    rest = {k: v for k, v in kwargs.items() if k != "adapter_names"}
    with cache[0].serving(names, ids.shape[1]) as extra:
        yield {**rest, **extra}


def refresh() -> None:
    """Recompute every cached weight of every compiled graph (``freeze=True`` only) at its next call.

    With ``freeze=True`` the backend caches values computed from the weights (folded static
    LoRA, stacked experts and routers, merged copies) and notices new tensors and autograd-visible
    updates (``copy_``, ``load_state_dict``), but not writes through ``.data`` (``p.data.copy_``,
    PEFT's ``hotswap_adapter``): call this after those. Without ``freeze`` nothing is cached and
    there is nothing to refresh.
    """
    from .runtime import epoch

    epoch.advance()
