"""What ``adafuse-bench`` prints and writes: the table, the speed targets, JSON and the plot.

Kept apart from the measuring (:mod:`adafuse_compile.bench.cli`) so that the figures can be
re-rendered from a JSON file without timing anything again.
"""

from __future__ import annotations

import datetime
import json
import os
import platform

import torch

from .timing import paired

__all__ = ["format_table", "machine_info", "speed_targets", "write_json", "write_plot"]

# The targets (one-token decode, fp32, this 2-core CPU).
MAX_RATIO_TO_BACKBONE = 1.10
MIN_OVERHEAD_RECOVERED = 0.90
MIN_INDUCTOR_OVER_ADAFUSE = 1.0
MAX_COMPILE_RATIO = 1.5


def machine_info() -> dict:
    """The figures' context: versions, threads and the CPU model."""
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        # Other work on the machine slows every configuration (2 cores: a second busy process
        # turned 8 ms steps into 80 ms ones here); the load says whether the figures are clean.
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def _by(results: list[dict]) -> dict[tuple[str, int], dict]:
    return {(r["config"], r["batch"]): r for r in results}


def speed_targets(results: list[dict]) -> list[dict]:
    """Each target of the issue, for every adafuse configuration whose comparisons were run.

    "Overhead recovered" is (MoLE eager - adafuse) / (MoLE eager - backbone under Inductor):
    1.0 means the adapters cost nothing over the compiled backbone. Like every ratio here, it is
    the median over rounds of its value within each round (rows timed together carry
    ``round_ms_per_token``), else computed from the medians.
    """
    by = _by(results)

    def paired_rows(fn, *rows):
        rounds = [row.get("round_ms_per_token") for row in rows]
        if all(rounds) and len({len(x) for x in rounds}) == 1:
            return paired(fn, *rounds)
        return fn(*(row["ms_per_token"] for row in rows))

    out = []
    for r in results:
        if r["backend"] != "adafuse":
            continue
        b, m = r["batch"], r["model"]
        base, eager, inductor = (by.get((k, b)) for k in ("backbone-inductor", f"{m}-eager", f"{m}-inductor"))

        def add(target, value, limit, is_max):
            out.append({"config": r["config"], "name": r["name"], "batch": b, "target": target,
                        "value": value, "limit": limit, "met": value <= limit if is_max else value >= limit})

        if base:
            add("adafuse / backbone inductor", paired_rows(lambda a, bb: a / bb, r, base), MAX_RATIO_TO_BACKBONE, True)
        if base and eager and eager["ms_per_token"] > base["ms_per_token"]:
            # A round where eager was not slower than the backbone recovers nothing (and divides by 0).
            recovered = paired_rows(lambda a, e, bb: (e - a) / (e - bb) if e > bb else 0.0, r, eager, base)
            add("overhead recovered", recovered, MIN_OVERHEAD_RECOVERED, False)
        if inductor:
            add("inductor / adafuse", paired_rows(lambda a, i: i / a, r, inductor), MIN_INDUCTOR_OVER_ADAFUSE, False)
            if inductor["compile_s"] > 0:
                add("compile adafuse / inductor", r["compile_s"] / inductor["compile_s"], MAX_COMPILE_RATIO, True)
    return out


def _check_text(r: dict) -> str:
    c = r["check"]
    if c is None:
        return "reference"
    diff = "" if c["max_logit_diff"] is None else f"max|dlogit| {c['max_logit_diff']:.1e}"
    if c["tokens_equal"]:
        return f"tokens equal, {diff}"
    m = c["first_mismatch"]
    where = f"step {m['step']} row {m['row']}: {m['got']} vs {m['expected']}"
    if c["exact_required"]:
        return f"MISMATCH at {where}, {diff}"
    return f"{diff} (rounding allowed; first differing token at {where})"


def _sites_text(r: dict) -> str:
    return " ".join(f"{k} {v}" for k, v in sorted(r["sites"].items())) or "-"


def format_table(header: str, results: list[dict], targets: list[dict]) -> str:
    """The terminal table: one block per batch size, then each speed target, met or missed."""
    lines = [header]
    for batch in sorted({r["batch"] for r in results}):
        rows = [("configuration", "ms/token", "tokens/s", "vs bb-ind", "compile s", "sites", "output")]
        for r in (r for r in results if r["batch"] == batch):
            ratio = "-" if r["vs_backbone_inductor"] is None else f"{r['vs_backbone_inductor']:.2f}"
            rows.append((r["name"], f"{r['ms_per_token']:.2f}", f"{r['tokens_per_s']:.1f}", ratio,
                         f"{r['compile_s']:.1f}", _sites_text(r), _check_text(r)))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
        lines += ["", f"batch {batch}"]
        for row in rows:
            cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:5], widths[1:5])]
            lines.append("  ".join(cells + [row[5].ljust(widths[5]), row[6]]).rstrip())
    if targets:
        lines += ["", "speed targets"]
        for t in targets:
            pct = t["target"] == "overhead recovered"
            value, limit = (f"{100 * t['value']:.0f}%", f"{100 * t['limit']:.0f}%") if pct else (
                f"{t['value']:.2f}", f"{t['limit']:.2f}")
            op = "<=" if t["target"].startswith(("adafuse", "compile")) else ">="
            lines.append(f"  {t['name']}, batch {t['batch']}: {t['target']} = {value} "
                         f"(target {op} {limit}) {'met' if t['met'] else 'MISSED'}")
    return "\n".join(lines)


def write_json(path: str, payload: dict) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")


def write_plot(path: str, results: list[dict], title: str) -> None:
    """ms/token per configuration, one panel per batch size; the dashed line is the target
    (1.10 x the backbone under Inductor). Needs matplotlib (``pip install adafuse-compile[plot]``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in results})
    names = list(dict.fromkeys(r["name"] for r in results))
    colors = {"backbone": "#7f7f7f", "mole": "#1f77b4", "pregated": "#2ca02c"}
    fig, axes = plt.subplots(1, len(batches), figsize=(4.2 * len(batches) + 2.2, 0.32 * len(names) + 1.4),
                             sharey=True, squeeze=False)
    by = {(r["name"], r["batch"]): r for r in results}
    for ax, batch in zip(axes[0], batches):
        rows = [by.get((n, batch)) for n in names]
        ys = range(len(names))
        ax.barh(ys, [r["ms_per_token"] if r else 0 for r in rows],
                color=[colors.get(r["model"], "#999999") if r else "none" for r in rows])
        for y, r in zip(ys, rows):
            if r and r["vs_backbone_inductor"] is not None:
                ax.text(r["ms_per_token"], y, f" {r['vs_backbone_inductor']:.2f}x", va="center", fontsize=7)
        base = by.get(("backbone inductor", batch))
        if base:
            ax.axvline(base["ms_per_token"] * MAX_RATIO_TO_BACKBONE, color="#d62728", ls="--", lw=0.8)
        ax.set_title(f"batch {batch}", fontsize=9)
        ax.set_xlabel("ms per decode step")
        ax.margins(x=0.18)
        ax.tick_params(labelsize=8)
    axes[0][0].set_yticks(range(len(names)), names)
    axes[0][0].invert_yaxis()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
