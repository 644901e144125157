"""Expert loops that skip empty experts (``if not mask.any(): continue``), made traceable.

Token-routed adapter code often loops over experts and skips those no token chose
(eulerforge's ``MixtureLoRALinear``)::

    for e in range(E):
        mask = idx_k == e
        if not mask.any():          # a branch on data: Dynamo breaks the graph here
            continue
        d = self.experts[e](t[mask])
        delta[mask] += d * w[mask]

The branch only saves work: when ``mask`` selects nothing, the rest of the iteration gathers
empty rows, computes on them and adds nothing. Each break splits the expert loop across graph
fragments, so no graph holds a whole adapter site and nothing is fused.

:func:`skip_branches_when_compiling` gives each module whose ``forward`` has such a loop a copy
of that ``forward`` in which the test reads ``(self.training or not
torch.compiler.is_compiling() or mask.dtype != torch.bool) and not mask.any()``: run eagerly, in
training, or with a mask that is not boolean (an all-zero integer index selects row 0, not
nothing) it is the original code, branch included; traced by Dynamo in eval mode the branch is
gone and the loop is one graph. That is exact only if the rest of the iteration (``rest``) does
nothing when ``mask`` selects nothing, which is proved from the source, for any weights and
inputs, per module instance (what ``rest`` calls is the instance's own) before its copy is
installed:

1. every statement of ``rest`` either binds a local name that nothing outside ``rest`` reads (a
   temporary of the iteration), or writes only the positions ``mask`` selects
   (``acc[mask] += v``, ``acc[mask] = v``): with no position selected, nothing is written;
2. every expression of ``rest`` has no effect of its own and cannot fail on empty rows:
   operators, attribute and item reads, torch functions and tensor methods that are not in place
   (``*_``), not random and not reductions that raise on an empty tensor (``max``, ``item``...);
   a method name a module also has (``.to()``, ``.forward()``) only on a tensor of ``self``; and
   calls of submodules whose own ``forward`` is such code (recursively; ``nn.Linear``,
   ``nn.Identity``, ``nn.Dropout`` and activations are), without hooks.

Anything else keeps the original ``forward`` (and its graph breaks), and the reason is logged
and returned. Hooks added after a model was compiled are not seen (as Dynamo does not see
them). Only :func:`adafuse_compile.compile` and :func:`adafuse_compile.explain` install these
copies; plain ``torch.compile`` sees the model as written.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import logging
import textwrap
import types

import torch
from torch import nn

log = logging.getLogger("adafuse_compile")

__all__ = ["BranchReport", "skip_branches_when_compiling"]

# Called as submodules from the rest of an iteration: no effect besides their output (Dropout
# draws no random number for the empty rows of a skipped expert; in training the branch stays).
_PURE_MODULES = (nn.Linear, nn.Identity, nn.Dropout, nn.ReLU, nn.SiLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.Softmax)
_RANDOM = {"dropout", "rand", "rand_like", "randn", "randn_like", "randint", "randint_like", "randperm", "bernoulli",
           "multinomial", "normal", "poisson", "uniform", "exponential", "geometric", "cauchy", "log_normal"}
# Reductions that raise on an empty tensor: the skip would have avoided the error.
_RAISES_ON_EMPTY = {"max", "min", "amax", "amin", "argmax", "argmin", "item", "kthvalue", "median", "nanmedian",
                    "mode", "topk", "tolist"}
_BUILTINS = {"len", "int", "float", "bool", "abs", "range", "tuple", "list", "isinstance"}
# Method names a module shares with tensors (``.to()``, ``.float()``, ``.forward()``...): on a
# receiver that may be a module they can change it, or run its code unchecked.
_MODULE_METHODS = frozenset(name for name in dir(nn.Module) if not name.startswith("__"))
# Prepended to the skip's test: the branch stays when running eagerly, in training, or when the
# mask is not boolean (an all-zero integer index selects row 0, not nothing).
_GUARD = "({self}.training or not torch.compiler.is_compiling() or {mask}.dtype != torch.bool)"
_MAX_DEPTH = 4


@dataclasses.dataclass
class BranchReport:
    """One module class whose ``forward`` skips empty experts: made branch-free when compiling, or why not."""

    cls: str
    installed: bool
    reason: str
    modules: int = 0  # instances given the branch-free forward


def skip_branches_when_compiling(model: nn.Module) -> list[BranchReport]:
    """Install the branch-free ``forward`` on every module of ``model`` whose class's forward skips
    empty experts and is proved not to need the skip (module docstring), per instance (what a
    forward calls, ``self.experts[e]``, is the instance's own). Idempotent: a copy installed
    earlier and no longer proved (a hook added since) is removed."""
    reports: dict[type, BranchReport] = {}
    parsed: dict[type, _Parsed | None] = {}
    for module in model.modules():
        cls = type(module)
        if cls not in parsed:
            parsed[cls] = _parse(cls)
            if parsed[cls] is not None:
                reports[cls] = BranchReport(cls.__qualname__, False, "")
        found = parsed[cls]
        if found is None or not _same_forward(module):
            continue
        why = found.why_not or _why_not(found, module)
        report = reports[cls]
        if why is not None:
            if "forward" in module.__dict__:
                del module.forward
            if not report.installed:
                report.reason = f"the skip stays: {why}"
            continue
        if "forward" not in module.__dict__:
            module.forward = types.MethodType(found.branch_free, module)
        report.installed, report.modules = True, report.modules + 1
        report.reason = ("the skip of empty experts (`if not mask.any(): continue`) is taken only eagerly (proved: "
                         "the rest of the iteration writes only the rows the mask selects)")
    for report in reports.values():
        log.info("adafuse: %s.forward skips empty experts: %s", report.cls,
                 f"branch-free when compiling ({report.modules} module(s)): {report.reason}" if report.installed
                 else report.reason)
    return list(reports.values())


def _same_forward(module: nn.Module) -> bool:
    """The instance runs its class's forward (nothing set on it, or our copy)."""
    own = module.__dict__.get("forward")
    return own is None or getattr(getattr(own, "__func__", None), "__adafuse_branch_free__", False)


@dataclasses.dataclass
class _Parsed:
    """A class's forward with empty-expert skips: its syntax tree, the skips, the branch-free copy."""

    forward: types.FunctionType
    fdef: ast.FunctionDef
    skips: list  # (the loop, the index of the skip in its body, the mask's name)
    first_line: int  # the forward's first line in its file
    branch_free: types.FunctionType | None
    why_not: str | None  # what no instance can have proved (closures, no `torch` global)


def _parse(cls: type) -> _Parsed | None:
    forward = getattr(cls, "forward", None)
    if not isinstance(forward, types.FunctionType) or cls.__module__.startswith("torch."):
        return None
    try:
        source = textwrap.dedent(inspect.getsource(forward))
        filename = inspect.getsourcefile(forward) or "<unknown>"
        _, first_line = inspect.getsourcelines(forward)
    except (OSError, TypeError):
        return None
    fdef = ast.parse(source).body[0]
    if not isinstance(fdef, ast.FunctionDef):
        return None
    skips = [(loop, i, mask) for loop in ast.walk(fdef) if isinstance(loop, ast.For)
             for i, stmt in enumerate(loop.body) if (mask := _empty_skip(stmt)) is not None]
    if not skips:
        return None
    if forward.__code__.co_freevars:
        why = f"its forward reads closure variables {forward.__code__.co_freevars} (a copy cannot share them)"
        return _Parsed(forward, fdef, skips, first_line, None, why)
    if forward.__globals__.get("torch") is not torch:
        why = "its module does not import torch as `torch` (the branch-free test reads torch.compiler)"
        return _Parsed(forward, fdef, skips, first_line, None, why)
    tree = ast.parse(source)  # a second tree to edit: the first stays as written, for the checks
    loops = [loop for loop in ast.walk(tree.body[0]) if isinstance(loop, ast.For)]
    this = fdef.args.args[0].arg
    for loop in loops:
        for stmt in loop.body:
            mask = _empty_skip(stmt)
            if mask is not None:
                guard = ast.parse(_GUARD.format(self=this, mask=mask), mode="eval").body
                stmt.test = ast.BoolOp(op=ast.And(), values=[guard, stmt.test])
    ast.fix_missing_locations(tree)
    ast.increment_lineno(tree, first_line - 1)
    namespace: dict = {}
    exec(compile(tree, filename, "exec"), forward.__globals__, namespace)  # noqa: S102 - the class's own source
    fn = namespace[fdef.name]
    fn.__qualname__, fn.__defaults__, fn.__kwdefaults__ = forward.__qualname__, forward.__defaults__, forward.__kwdefaults__
    fn.__adafuse_branch_free__ = True
    return _Parsed(forward, fdef, skips, first_line, fn, None)


def _empty_skip(stmt: ast.stmt) -> str | None:
    """``mask`` for ``if not mask.any(): continue`` or ``if not torch.any(mask): continue``."""
    if not (isinstance(stmt, ast.If) and not stmt.orelse and len(stmt.body) == 1
            and isinstance(stmt.body[0], ast.Continue)):
        return None
    test = stmt.test
    if not (isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not) and isinstance(test.operand, ast.Call)):
        return None
    call = test.operand
    if call.keywords or not isinstance(call.func, ast.Attribute) or call.func.attr != "any":
        return None
    if not call.args and isinstance(call.func.value, ast.Name):
        return call.func.value.id
    if (len(call.args) == 1 and isinstance(call.args[0], ast.Name) and isinstance(call.func.value, ast.Name)
            and call.func.value.id == "torch"):
        return call.args[0].id
    return None


def _why_not(parsed: _Parsed, module: nn.Module) -> str | None:
    """Why the rest of some skip's iteration could do something for an empty mask, on ``module``."""
    fdef, forward = parsed.fdef, parsed.forward

    def line(node: ast.AST) -> int:
        return node.lineno + parsed.first_line - 1

    for loop, i, mask in parsed.skips:
        rest = loop.body[i + 1:]
        inside = {id(n) for stmt in rest for n in ast.walk(stmt)}
        temporaries = set()
        for stmt in rest:
            target = _single_target(stmt)
            if isinstance(target, ast.Name) and isinstance(stmt, ast.Assign):
                temporaries.add(target.id)
            elif isinstance(target, ast.Subscript) and isinstance(stmt, (ast.Assign, ast.AugAssign)):
                if not (isinstance(target.slice, ast.Name) and target.slice.id == mask):
                    return f"line {line(stmt)}: a write indexed by something other than `{mask}`"
                if not isinstance(target.value, ast.Name) or target.value.id == mask:
                    return f"line {line(stmt)}: a masked write into something other than a local tensor"
            else:
                return f"line {line(stmt)}: a statement other than a temporary or a write into the rows `{mask}` selects"
            why = _impure(stmt.value, forward.__globals__, module, 0)
            if why is not None:
                return f"line {line(stmt)}: {why}"
        if mask in temporaries:
            return f"`{mask}` is reassigned after the skip"
        for node in ast.walk(fdef):
            if (isinstance(node, ast.Name) and node.id in temporaries and id(node) not in inside
                    and isinstance(node.ctx, ast.Load)):
                return f"`{node.id}`, computed after the skip, is read elsewhere (line {line(node)})"
    return None


def _single_target(stmt: ast.stmt):
    if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1:
        return stmt.targets[0]
    if isinstance(stmt, ast.AugAssign) and isinstance(stmt.op, (ast.Add, ast.Sub)):
        return stmt.target
    return None


_PURE_NODES = (ast.Name, ast.Constant, ast.Attribute, ast.Subscript, ast.BinOp, ast.UnaryOp, ast.Compare,
               ast.BoolOp, ast.IfExp, ast.Tuple, ast.List, ast.Slice, ast.Starred, ast.keyword, ast.Load,
               ast.operator, ast.unaryop, ast.cmpop, ast.boolop, ast.expr_context)


def _impure(expr: ast.AST, globals_: dict, module: nn.Module, depth: int) -> str | None:
    """Why evaluating ``expr`` (in a forward of ``module``) could have an effect, or None."""
    for node in ast.walk(expr):
        if isinstance(node, ast.Call):
            why = _impure_call(node, globals_, module, depth)
            if why is not None:
                return why
        elif not isinstance(node, _PURE_NODES):
            return f"`{ast.unparse(node)}` ({type(node).__name__}) is not a plain expression"
    return None


def _impure_call(call: ast.Call, globals_: dict, module: nn.Module, depth: int) -> str | None:
    func, text = call.func, ast.unparse(call.func)
    submodules = _submodules(func, module)
    if submodules is not None:  # self.experts[e](...), self.router(...)
        for sub in submodules:
            why = _impure_module(sub, depth + 1)
            if why is not None:
                return f"`{text}(...)`: {why}"
        return None
    if isinstance(func, ast.Name):
        return None if func.id in _BUILTINS and func.id not in globals_ else f"`{text}(...)` may have effects"
    if not isinstance(func, ast.Attribute):
        return f"`{text}(...)` may have effects"
    name = func.attr
    if name.endswith("_") and not name.startswith("_"):
        return f"`{text}(...)` writes in place"
    if name in _RANDOM:
        return f"`{text}(...)` draws random numbers"
    if name in _RAISES_ON_EMPTY:
        return f"`{text}(...)` raises on the empty rows of a skipped expert"
    if name.startswith("__"):
        return f"`{text}(...)` may have effects"
    namespace = _global_module(func.value, globals_)
    if namespace is not None:  # torch.cat(...), F.linear(...), torch.nn.functional.silu(...)
        return None if namespace.__name__.split(".")[0] == "torch" else f"`{text}(...)` is not a torch function"
    owner = _dotted_value(func.value, {"self": module})
    if owner is not _UNRESOLVED:
        return None if isinstance(owner, torch.Tensor) else f"`{text}(...)` calls a method of the module"
    if not hasattr(torch.Tensor, name) or name in _MODULE_METHODS:
        return f"`{text}(...)` is not a tensor method, or is also a module's"
    return None  # a tensor method


_UNRESOLVED = object()


def _dotted_value(node: ast.AST, roots: dict):
    """The value of the dotted name ``node`` (``a``, ``a.b.c``) whose root ``a`` is a key of
    ``roots``, or ``_UNRESOLVED`` where ``node`` is no such name."""
    path = []
    while isinstance(node, ast.Attribute):
        path.append(node.attr)
        node = node.value
    if not (isinstance(node, ast.Name) and node.id in roots):
        return _UNRESOLVED
    value = roots[node.id]
    for attr in reversed(path):
        value = getattr(value, attr, None)
    return value


def _global_module(node: ast.AST, globals_: dict) -> types.ModuleType | None:
    """The Python module ``node`` (``torch``, ``F``, ``torch.nn.functional``) names, or None."""
    value = _dotted_value(node, globals_)
    return value if isinstance(value, types.ModuleType) else None


def _submodules(func: ast.AST, module: nn.Module) -> list[nn.Module] | None:
    """The submodules ``func`` (``self.a``, ``self.a.b``, ``self.a[i]``) may be, or None if it is none."""
    indexed = isinstance(func, ast.Subscript)
    node = func.value if indexed else func
    target = _dotted_value(node, {"self": module}) if isinstance(node, ast.Attribute) else _UNRESOLVED
    if not isinstance(target, nn.Module):
        return None
    if indexed:
        return list(target.children()) if isinstance(target, (nn.ModuleList, nn.Sequential, nn.ModuleDict)) else None
    return [target]


def _impure_module(module: nn.Module, depth: int) -> str | None:
    from torch.nn.modules import module as module_globals

    if module._forward_hooks or module._forward_pre_hooks or module_globals._global_forward_hooks or \
            module_globals._global_forward_pre_hooks:
        return f"{type(module).__name__} has forward hooks"
    if type(module).__call__ is not nn.Module.__call__ or type(module)._call_impl is not nn.Module._call_impl:
        return f"{type(module).__name__} overrides how it is called"
    if type(module) in _PURE_MODULES:
        return None
    if depth > _MAX_DEPTH:
        return f"{type(module).__name__} is nested too deep to check"
    forward = type(module).forward
    try:
        fdef = ast.parse(textwrap.dedent(inspect.getsource(forward))).body[0]
    except (OSError, TypeError, SyntaxError):
        return f"the source of {type(module).__name__}.forward is not available"
    for stmt in fdef.body:
        if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
            continue  # the docstring
        if isinstance(stmt, ast.Assign) and all(isinstance(t, ast.Name) for t in stmt.targets) or isinstance(
                stmt, ast.Return) and stmt.value is not None:
            why = _impure(stmt.value, forward.__globals__, module, depth)
            if why is not None:
                return f"{type(module).__name__}.forward: {why}"
            continue
        return f"{type(module).__name__}.forward has a statement other than local assignments and a return"
    return None
