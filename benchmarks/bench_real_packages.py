"""What adafuse does to tiny models built with real MoLE code: MoE-PEFT, eulerforge, mixlora, PEFT.

For each model: the sites ``explain`` finds and what became of them, the graph breaks, whether
``explain`` reports exactly the sites ``adafuse_compile.compile`` rewrote, and the largest
difference of the compiled output from eager. Prints a markdown table (and the graph-break
reasons under it). The MoE-PEFT, eulerforge and mixlora models are those of
``tests/e2e/real_packages.py``; PEFT's X-LoRA, Arrow and Poly are built as in
``tests/e2e/test_peft_moles.py``. A package that is not installed gets a row saying so.

    python benchmarks/bench_real_packages.py [--inner eager|inductor|aot_eager]

``--inner eager`` (default) runs the rewritten graphs as they are (seconds per model);
``inductor`` compiles them with Inductor (minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import importlib.util
import pathlib
import shlex
import sys
import tempfile
from typing import Callable

import torch
from torch import nn

import adafuse_compile
from adafuse_compile.backend import capture_rewrites

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests" / "e2e"))
import real_packages as rp  # noqa: E402

PEFT_IDS = torch.randint(0, 512, (2, 5), generator=torch.Generator().manual_seed(1))


@dataclasses.dataclass
class Case:
    label: str  # what real code, without the version
    dist: str  # the distribution whose version is shown
    module: str  # its import name (a missing one skips the row)
    build: Callable[[], tuple[nn.Module, dict]]  # -> (model, keyword inputs)


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _logits(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.logits


def _real(builder: Callable[[], rp.RealModel]) -> Callable[[], tuple[nn.Module, dict]]:
    def build():
        built = builder()
        return built.model, built.inputs

    return build


def _peft_cases(adapters: Callable[[], list[str]]) -> list[Case]:
    """PEFT X-LoRA, Arrow and Poly (``tests/e2e/real_packages.py``) on the tiny Llama."""

    def peft_case(build, **extra):
        return lambda: (build(), {"input_ids": PEFT_IDS, **extra})

    return [
        Case("PEFT X-LoRA, 3 adapters, top_k_lora=None", "peft", "peft",
             peft_case(lambda: rp.xlora_model(adapters()[:3]))),
        Case("PEFT X-LoRA, 3 adapters, top_k_lora=2 (softmax top-k)", "peft", "peft",
             peft_case(lambda: rp.xlora_model(adapters()[:3], 2, True))),
        Case("PEFT Arrow, 4 adapters, top_k=2", "peft", "peft", peft_case(lambda: rp.arrow_model(adapters()))),
        Case("PEFT Poly, 4 skills, 3 tasks", "peft", "peft", peft_case(rp.poly_model, task_ids=torch.tensor([0, 2]))),
    ]


def _saved_adapters(root: pathlib.Path) -> Callable[[], list[str]]:
    """Four saved random LoRA adapters of the tiny Llama, made at the first call."""
    paths: list[str] = []

    def get():
        if not paths:
            paths.extend(rp.save_lora_adapters(root))
        return paths

    return get


def cases(adapters: Callable[[], list[str]]) -> list[Case]:
    moe_peft = {"mola": "MoLA", "loramoe": "LoRAMoE", "mixlora": "MixLoRA top-k",
                "mixlora_top_p": "MixLoRA-dynamic top-p"}
    return [
        *[Case(f"MoE-PEFT {label}", "moe_peft", "moe_peft", _real(lambda kind=kind: rp.moe_peft_model(kind)))
          for kind, label in moe_peft.items()],
        Case("eulerforge MixtureLoRALinear (MLP)", "eulerforge", "eulerforge", _real(rp.eulerforge_model)),
        Case("mixlora MixLoRA (attention LoRA + MLP experts)", "mixlora", "mixlora", _real(rp.mixlora_model)),
        *_peft_cases(adapters),
    ]


def _short(text: str, n: int = 70) -> str:
    line = text.splitlines()[0] if text else ""
    return line if len(line) <= n else line[: n - 3] + "..."


def measure(case: Case, inner: str) -> tuple[list[str], list[str]]:
    """One table row, and the graph-break reasons."""
    name = f"{case.label} ({case.dist} {_version(case.dist)})"
    if importlib.util.find_spec(case.module) is None:
        return [name, *["-"] * 7, "not installed"], []
    model, inputs = case.build()
    with torch.no_grad():
        eager = _logits(model(**inputs))
        torch._dynamo.reset()
        try:
            with capture_rewrites() as rewrites:
                compiled = _logits(adafuse_compile.compile(model, inner=inner)(**inputs))
        finally:
            torch._dynamo.reset()
        report = adafuse_compile.explain(model, options={"inner": inner}, **inputs)
    explained = [(s.path, s.status) for s in report.sites]
    rewritten = [(s.path, s.status) for rw in rewrites for s in rw.sites]
    agree = "yes" if explained == rewritten else f"**no** ({len(explained)} vs {len(rewritten)} sites)"
    errors = [rw.error for rw in rewrites if rw.error]
    if errors:
        agree += f"; {len(errors)} graph(s) compiled unrewritten"
    left = list(dict.fromkeys(_short(s.reason) for s in report.sites if s.status == "left"))
    diff = (compiled - eager).abs().max().item()
    row = [name, str(len(report.sites)), str(report.count("fused")), str(report.count("folded")),
           str(report.count("left")), str(report.graph_breaks), agree, f"{diff:.2e}",
           "; ".join(left) or ("no site found" if not report.sites else "-")]
    return row, list(dict.fromkeys(_short(r, 110) for r in report.break_reasons))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inner", default="eager", choices=["eager", "inductor", "aot_eager"],
                    help="compiler for the rewritten graphs (default: eager)")
    a = ap.parse_args()
    print(f"$ {shlex.join(sys.orig_argv)}")
    print(f"torch {torch.__version__}, transformers {_version('transformers')}, {torch.get_num_threads()} thread(s); "
          f"adafuse_compile.compile(model, inner={a.inner!r}) vs eager, fp32, no_grad\n")
    header = ["real code (package version)", "sites", "fused", "folded", "left", "graph breaks",
              "explain == compile", "max abs diff compile vs eager", "reasons for left sites"]
    rows, breaks = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases(_saved_adapters(pathlib.Path(tmp))):
            try:
                row, reasons = measure(case, a.inner)
            except Exception as e:  # one broken package must not hide the other rows
                row = [f"{case.label} ({case.dist} {_version(case.dist)})", *["-"] * 7,
                       f"error: {_short(f'{type(e).__name__}: {e}')}"]
                reasons = []
            rows.append(row)
            breaks += [f"{case.label}: {r}" for r in reasons]
            print(f"  done: {row[0]}", file=sys.stderr, flush=True)
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |")
    if breaks:
        print("\ngraph breaks (first line of each reason):")
        for b in breaks:
            print(f"- {b}")


if __name__ == "__main__":
    main()
