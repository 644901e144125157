"""``adafuse-bench``: greedy decoding of a MoLE Llama, side by side with its backbone.

Configurations (``--configs``, glob patterns over the keys below) decode the same prompt with a
static KV cache; each is timed interleaved with the others in one process (round-robin, median
over repeats: this machine drifts 5-10% between processes, shared/MEASUREMENTS.md) and reported as
ms/token, tokens/s, compile time and the ratio to the backbone under Inductor. Outputs are
checked: every configuration is run once teacher-forced on its group's reference (the first
selected configuration of the same model, eager by default) and must choose the same tokens;
merge-switch configurations may differ by rounding, so only their max logit difference is
reported. Exit status 1 when a configuration that must match does not.

    adafuse-bench [--size small|medium] [--batch 1,8] [--configs 'backbone-*,mole-*'] \\
                  [--json out.json] [--plot out.png] [--profile 'mole-fused']
    adafuse-bench --device cuda --dtype bfloat16 --configs 'backbone-inductor*,mole-*,pregated-*'

On CUDA each timed decode ends with a device synchronisation (the steps themselves never sync:
tokens stay on the device), and the ``-cg`` configurations compile with
``mode="reduce-overhead"`` (CUDA graphs). Outside float32, compiled code may round differently
from eager, so tokens are compared but only their max logit difference is reported.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import fnmatch
import statistics
import sys
import time

import torch

from ..api import compile as adafuse_compile_model
from ..backend import backend_with_mode, capture_rewrites
from .report import format_table, machine_info, speed_targets, write_json, write_plot
from .decoding import DecodeResult, GreedyDecoder, compare_to_reference
from ..models import DEFAULT_TARGETS, add_lora_moe, add_pregated_lora_moe, tiny_llama
from .timing import interleaved_times, paired_ratio

__all__ = ["CONFIGS", "Config", "main", "select_configs"]

MOLE = dict(experts=8, top_k=2, rank=8)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclasses.dataclass(frozen=True)
class Config:
    """One column of the comparison: a model variant run by one backend with its options."""

    key: str
    name: str
    model: str  # "backbone", "mole" (a router per site) or "pregated" (one token-level gate)
    backend: str | None  # None: eager
    options: dict | None = None
    exact: bool = True  # must choose the reference's tokens (False: rounding may differ)
    default: bool = True
    mode: str | None = None  # torch.compile's mode ("reduce-overhead": CUDA graphs)


CONFIGS: tuple[Config, ...] = (
    Config("backbone-eager", "backbone eager", "backbone", None, default=False),
    Config("backbone-inductor", "backbone inductor", "backbone", "inductor"),
    Config("mole-eager", "MoLE eager", "mole", None),
    Config("mole-inductor", "MoLE inductor", "mole", "inductor"),
    Config("mole-fused", "MoLE adafuse fused", "mole", "adafuse", {"strategy": "fused"}),
    # Dynamo skips the guards of unchanged module subtrees (runtime/module_guards.py): what the
    # per-parameter guard tree of many-tensor models (MoLA style) costs is the difference.
    Config("mole-tags", "MoLE adafuse module-tags", "mole", "adafuse", {"strategy": "fused", "guards": "module-tags"},
           default=False),
    # The same under the freezing contract: stacked expert lists and routers cached (what the
    # sound default, reading every weight at every call, costs is the difference to mole-fused).
    Config("mole-frozen", "MoLE adafuse freeze", "mole", "adafuse", {"strategy": "fused", "freeze": True},
           default=False),
    # Per-layer routers: no decision is shared, so there is no group to merge; kept to show that.
    Config("mole-merge", "MoLE adafuse merge", "mole", "adafuse", {"strategy": "merge", "freeze": True}, exact=False,
           default=False),
    # Inductor's own code for each site instead of the custom op (lowering="auto" picks the op
    # when the C++ kernels build; the decomposed form was slower: options.py, lowering).
    Config("mole-decomposed", "MoLE adafuse decomposed", "mole", "adafuse", {"strategy": "fused",
                                                                             "lowering": "decomposed"},
           default=False),
    # Inductor's Python wrapper around the fused ops instead of its C++ one (the default).
    Config("mole-pywrapper", "MoLE adafuse Python wrapper", "mole", "adafuse", {"strategy": "fused",
                                                                                "cpp_wrapper": False},
           default=False),
    Config("pregated-eager", "pre-gated eager", "pregated", None),
    Config("pregated-inductor", "pre-gated inductor", "pregated", "inductor", default=False),
    Config("pregated-fused", "pre-gated adafuse fused", "pregated", "adafuse", {"strategy": "fused"}),
    Config("pregated-merge", "pre-gated adafuse merge", "pregated", "adafuse", {"strategy": "merge", "freeze": True},
           exact=False),
    # The cost model's run-time guard picks fused or merged per step.
    Config("pregated-auto", "pre-gated adafuse auto", "pregated", "adafuse", {"strategy": "auto", "freeze": True},
           exact=False, default=False),
    # CUDA graphs (mode="reduce-overhead"; on a CPU Inductor skips them and these equal the above).
    Config("backbone-inductor-cg", "backbone inductor + CUDA graphs", "backbone", "inductor", default=False,
           mode="reduce-overhead"),
    Config("mole-fused-cg", "MoLE adafuse fused + CUDA graphs", "mole", "adafuse", {"strategy": "fused"},
           default=False, mode="reduce-overhead"),
    Config("pregated-fused-cg", "pre-gated adafuse fused + CUDA graphs", "pregated", "adafuse", {"strategy": "fused"},
           default=False, mode="reduce-overhead"),
    Config("pregated-merge-cg", "pre-gated adafuse merge + CUDA graphs", "pregated", "adafuse",
           {"strategy": "merge", "freeze": True}, exact=False, default=False, mode="reduce-overhead"),
)


def select_configs(patterns: str | None) -> list[Config]:
    """Configurations whose key matches one of the comma-separated glob ``patterns``, in
    registry order (eager first per model, so it becomes the reference); ``None``: the defaults."""
    if patterns is None:
        return [c for c in CONFIGS if c.default]
    pats = [p.strip() for p in patterns.split(",") if p.strip()]
    if pats == ["all"]:
        return list(CONFIGS)
    unmatched = [p for p in pats if not any(fnmatch.fnmatchcase(c.key, p) for c in CONFIGS)]
    if unmatched:
        raise SystemExit(f"--configs: {unmatched} match no configuration; keys: {', '.join(c.key for c in CONFIGS)}")
    return [c for c in CONFIGS if any(fnmatch.fnmatchcase(c.key, p) for p in pats)]


def load_backbone(size: str, path: str | None) -> torch.nn.Module:
    """A seeded random Llama of ``size`` (the same weights every call), or a local checkpoint."""
    if path is None:
        return tiny_llama(size)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True).eval()


def add_styled_adapters(model: torch.nn.Module, style: str) -> torch.nn.Module:
    """MoLE adapters (E=8, k=2, r=8) on all seven projections, written in ``style``: our
    stacked ``LoRAMoELinear`` ("ours") or one of the project idioms of ``models.styles``."""
    if style == "ours":
        return add_lora_moe(model, **MOLE)
    from ..models.styles import STYLES

    for name, module in list(model.named_modules()):
        parent_name, _, attr = name.rpartition(".")
        if attr in DEFAULT_TARGETS and isinstance(module, torch.nn.Linear):
            setattr(model.get_submodule(parent_name), attr, STYLES[style](module, **MOLE))
    return model


def build_model(kind: str, size: str, path: str | None, style: str) -> torch.nn.Module:
    model = load_backbone(size, path)
    if kind == "mole":
        model = add_styled_adapters(model, style)
    elif kind == "pregated":
        model = add_pregated_lora_moe(model, **MOLE)
    return model.eval()


def compiled_forward(model: torch.nn.Module, cfg: Config, inner: str = "inductor"):
    """The forward a configuration runs: ``model.forward`` itself, or ``torch.compile`` of it
    with static shapes (each batch size gets its own graph, as a serving engine would)."""
    if cfg.backend is None:
        return model.forward
    if cfg.backend != "adafuse":
        return torch.compile(model.forward, backend=cfg.backend, dynamic=False, mode=cfg.mode)
    options = {**(cfg.options or {}), "inner": inner}
    if options.get("guards") == "module-tags":  # installs the guard filter it needs
        return adafuse_compile_model(model, dynamic=False, mode=cfg.mode, **options)
    return torch.compile(model.forward, backend=backend_with_mode(cfg.mode), dynamic=False, options=options)


class Progress:
    """A tqdm bar on stderr, or plain lines where tqdm is missing."""

    def __init__(self, total: int, desc: str):
        try:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True)
        except ImportError:
            self._bar = None
            print(f"{desc}: 0/{total}", file=sys.stderr, flush=True)
        self.total, self.desc, self.done = total, desc, 0

    def update(self, note: str = "") -> None:
        self.done += 1
        if self._bar is not None:
            self._bar.set_postfix_str(note, refresh=False)
            self._bar.update(1)
        else:
            print(f"{self.desc}: {self.done}/{self.total} {note}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def prepare(cfg: Config, model, forward, prompt, new_tokens: int, reference: DecodeResult | None):
    """Prefill, then the first (compiling) decode, teacher-forced on ``reference`` when given.

    Compile time is the first decode's wall time minus a second, warm decode's: it includes
    every graph and recompilation the steps needed.
    """
    decoder = GreedyDecoder(model, forward, prompt, new_tokens)
    teacher = None if reference is None else reference.tokens
    with capture_rewrites() as rewrites:
        t0 = time.perf_counter()
        first = decoder.decode(teacher=teacher, keep_logits=True)
        t1 = time.perf_counter()
    decoder.decode()
    compile_s = max(0.0, (t1 - t0) - (time.perf_counter() - t1))
    check = None
    if reference is not None:
        exact = cfg.exact and first.logits.dtype == torch.float32  # logits keep the model's dtype
        check = {**compare_to_reference(first, reference), "exact_required": exact}
    return decoder, first, compile_s, site_counts(rewrites), check


def site_counts(rewrites) -> dict[str, int]:
    """What the backend did to the graphs of one configuration: sites per status, routers
    hoisted, pre-gate groups."""
    counts = collections.Counter(s.status for rw in rewrites for s in rw.sites)
    counts["hoisted"] = sum(len(h.routers) for rw in rewrites for h in rw.hoisted)
    counts["group"] = sum(len(rw.groups) for rw in rewrites)
    return {k: v for k, v in counts.items() if v}


def profile_decode(decoder: GreedyDecoder, top: int = 15) -> list[dict]:
    """The ops that take the time of one decode (torch.profiler, self CPU time per token)."""
    from torch.profiler import ProfilerActivity, profile

    decoder.decode()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        decoder.decode()
    n = decoder.new_tokens
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return [{"op": e.key, "self_ms_per_token": e.self_cpu_time_total / 1e3 / n,
             "calls_per_token": e.count / n} for e in events]


def run_batch(batch: int, configs: list[Config], models: dict, forwards: dict, args):
    """Prepare every configuration for one batch size, then time them interleaved."""
    gen = torch.Generator().manual_seed(args.seed)
    vocab = next(iter(models.values())).config.vocab_size
    prompt = torch.randint(0, vocab, (batch, args.prompt), generator=gen).to(args.device)
    decoders, refs, rows = {}, {}, []
    bar = Progress(len(configs), f"batch {batch}: compile+check")
    for cfg in configs:
        ref_key, reference = refs.get(cfg.model, (None, None))
        decoder, first, compile_s, sites, check = prepare(
            cfg, models[cfg.model], forwards[cfg.key], prompt, args.new, reference)
        if reference is None:
            refs[cfg.model] = (cfg.key, first)
        decoders[cfg.key] = decoder
        rows.append({"config": cfg.key, "name": cfg.name, "model": cfg.model, "backend": cfg.backend,
                     "options": cfg.options, "batch": batch, "compile_s": compile_s, "sites": sites,
                     "reference": ref_key, "check": check})
        bar.update(f"{cfg.key} {compile_s:.0f} s")
    bar.close()
    settle = 1  # each timed decode follows an untimed one (bench.timing)
    bar = Progress((1 + settle) * args.repeats * len(decoders), f"batch {batch}: timing")

    def ticking(fn):
        def call():
            fn()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            bar.update()
        return call

    per_round = interleaved_times({k: ticking(d.decode) for k, d in decoders.items()},
                                  rounds=args.repeats, reps=1, warmup=0, settle=settle)  # warmed in prepare
    bar.close()
    base = "backbone-inductor" if "backbone-inductor" in per_round else None
    for row in rows:
        ms = statistics.median(per_round[row["config"]]) * 1e3 / args.new
        row.update(ms_per_token=ms, tokens_per_s=batch * 1e3 / ms,
                   round_ms_per_token=[t * 1e3 / args.new for t in per_round[row["config"]]],
                   vs_backbone_inductor=None if base is None else paired_ratio(per_round, row["config"], base))
    profiles = {}
    for cfg in configs:
        if args.profile and any(fnmatch.fnmatchcase(cfg.key, p) for p in args.profile.split(",")):
            print(f"profiling {cfg.key} at batch {batch}", file=sys.stderr, flush=True)
            profiles[cfg.key] = profile_decode(decoders[cfg.key])
    return rows, profiles


def format_profiles(profiles: dict) -> str:
    lines = []
    for (key, batch), events in profiles.items():
        lines += ["", f"profile of {key}, batch {batch} (self CPU ms per decoded token)"]
        for e in events:
            lines.append(f"  {e['self_ms_per_token']:8.3f}  {e['calls_per_token']:6.1f} calls  {e['op'][:90]}")
    return "\n".join(lines)


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="adafuse-bench", description="Greedy decoding of a MoLE Llama, side by side with its backbone.",
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="configurations: " + ", ".join(
                                     c.key + ("" if c.default else " (not default)") for c in CONFIGS))
    ap.add_argument("--size", default="small", choices=["tiny", "small", "medium"],
                    help="random seeded Llama: small = hidden 512, 4 layers; medium = hidden 1024, 8 layers")
    ap.add_argument("--model", metavar="PATH", help="a local transformers checkpoint directory instead of --size")
    from ..models.styles import STYLES

    ap.add_argument("--style", default="ours", choices=["ours", *STYLES],
                    help="how the per-layer MoLE adapters are written: ours, or a models.styles key (mola, ...)")
    # Default batch 1 only: each batch size is one more compile of every configuration; the
    # defaults with "1,8" took 12.7 min on this (shared, loaded) 2-core VM.
    ap.add_argument("--batch", default="1", help="comma-separated batch sizes, e.g. 1,8")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens (prefilled eagerly)")
    ap.add_argument("--new", type=int, default=16, help="decode steps timed per repeat")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved rounds; the median is reported")
    ap.add_argument("--configs", help="comma-separated glob patterns over configuration keys, or 'all'")
    ap.add_argument("--inner", default="inductor", choices=["inductor", "eager", "aot_eager"],
                    help="compiler after the adafuse passes (eager: a quick functional check, not a speed test)")
    ap.add_argument("--device", default="cpu", help="where the models run: cpu, cuda, cuda:1, ...")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="the models' dtype")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads")
    ap.add_argument("--seed", type=int, default=0, help="prompt seed")
    ap.add_argument("--cold", action="store_true",
                    help="disable Inductor's on-disk caches: compile times as on a first run, comparable between "
                         "configurations (the default reuses cached kernels, so a configuration compiled after "
                         "a similar one looks cheaper)")
    ap.add_argument("--profile", metavar="PATTERNS", help="torch.profiler top ops of these configurations")
    ap.add_argument("--json", metavar="FILE", help="write every figure and the machine to FILE")
    ap.add_argument("--plot", metavar="FILE", help="write a PNG of ms/token (needs matplotlib: the 'plot' extra)")
    args = ap.parse_args(argv)
    try:
        args.batches = [int(b) for b in args.batch.split(",") if b.strip()]
    except ValueError:
        ap.error(f"--batch must be comma-separated integers, got {args.batch!r}")
    if not args.batches or min(args.batches) < 1 or args.prompt < 1 or args.new < 1 or args.repeats < 1:
        ap.error("--batch, --prompt, --new and --repeats must be positive")
    return args


def describe(args, model_config) -> str:
    """The table's first line: the model, the workload and the machine."""
    what = args.model or f"{args.size} Llama"
    inner = "" if args.inner == "inductor" else f", adafuse inner={args.inner}"
    return (f"{what} (hidden {model_config.hidden_size}, {model_config.num_hidden_layers} layers), MoLE on all 7 "
            f"projections (E=8, k=2, r=8, {args.style}){inner}; prompt {args.prompt}, {args.new} greedy decode steps, "
            f"static KV cache, {args.dtype}, median of {args.repeats}, {'cold' if args.cold else 'cached'} compiles; "
            f"torch {torch.__version__}, {device_name(args.device)}")


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"{torch.get_num_threads()} threads, {machine_info()['cpu']}"


def configure_torch(args, compiled_graphs: int) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    # Every configuration compiles the same LlamaForCausalLM.forward code object: 7 compiled
    # configurations x 2 batch sizes pass Dynamo's default limit of 8 entries, after which it
    # would silently run the rest eagerly.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 2 * compiled_graphs)
    torch._inductor.config.force_disable_caches = args.cold


def main(argv=None) -> int:
    args = parse_args(argv)
    load_at_start = machine_info()["load_avg_1m"]
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise SystemExit("--plot needs matplotlib: pip install 'adafuse-compile[plot]'") from None
    configs = select_configs(args.configs)
    configure_torch(args, sum(c.backend is not None for c in configs) * len(args.batches))
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: torch sees no CUDA device")
    models = {k: build_model(k, args.size, args.model, args.style).to(args.device, DTYPES[args.dtype])
              for k in dict.fromkeys(c.model for c in configs)}
    header = describe(args, next(iter(models.values())).config)
    print(header.split(";")[0], file=sys.stderr, flush=True)
    forwards = {c.key: compiled_forward(models[c.model], c, args.inner) for c in configs}
    results, profiles = [], {}
    for batch in args.batches:
        rows, prof = run_batch(batch, configs, models, forwards, args)
        results += rows
        profiles.update({(k, batch): v for k, v in prof.items()})
    targets = speed_targets(results)
    print(format_table(header, results, targets) + format_profiles(profiles))
    if args.json:
        write_json(args.json, {
            "machine": {**machine_info(), "load_avg_1m_at_start": load_at_start},
            "settings": {k: getattr(args, k) for k in ("size", "model", "style", "batches", "prompt", "new",
                                                        "repeats", "seed", "cold", "inner", "device", "dtype")},
            "configs": [dataclasses.asdict(c) for c in configs],
            "results": results, "targets": targets,
            "profiles": [{"config": k, "batch": b, "top": v} for (k, b), v in profiles.items()],
        })
    if args.plot:
        write_plot(args.plot, results, header.split(";")[0])
    bad = [r for r in results if r["check"] and r["check"]["exact_required"] and not r["check"]["tokens_equal"]]
    if bad:
        print("MISMATCH: " + ", ".join(f"{r['config']} (batch {r['batch']})" for r in bad), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
