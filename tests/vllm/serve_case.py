"""One vLLM engine in this process: greedy tokens for fixed prompts, written as JSON.

    python tests/vllm/serve_case.py --model DIR --tp 1 --out OUT.json [--backend adafuse] [--options JSON]

Run by tests/vllm/test_vllm_serving.py in a subprocess per case (an engine leaves processes,
shared memory and Dynamo state behind; a hard timeout must be able to kill all of it), and by
benchmarks/bench_vllm.py. Prompts are token ids (no tokenizer in a tiny random checkpoint).
"""

from __future__ import annotations

import argparse
import json
import os
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--out", required=True)
    ap.add_argument("--backend", default="adafuse", help="compilation_config backend ('' for vLLM's default)")
    ap.add_argument("--mode", type=int, default=2,
                    help="compilation_config mode (2: DYNAMO_TRACE_ONCE); -1: no compilation_config (vLLM's default)")
    ap.add_argument("--options", default="{}", help="additional_config['adafuse'] as JSON")
    ap.add_argument("--prompts", default="[[1, 17, 42, 99, 7], [3, 250, 11], [400, 2, 2, 9, 81, 33, 5]]")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--bench", type=int, default=0, help="also time N concurrent requests, after a warm-up")
    ap.add_argument("--bench-tokens", type=int, default=64, help="tokens generated per timed request")
    args = ap.parse_args()

    if args.tp > 1:  # one OpenMP thread group per rank on this single-NUMA-node CPU
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(i % os.cpu_count()) for i in range(args.tp)))
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    compilation = {"mode": args.mode} if args.mode >= 0 else {}
    if args.backend:
        compilation["backend"] = args.backend
    t0 = time.perf_counter()
    llm = LLM(model=args.model, skip_tokenizer_init=True, tensor_parallel_size=args.tp, dtype="float32",
              compilation_config=compilation or None, additional_config={"adafuse": json.loads(args.options)},
              max_model_len=256, max_num_seqs=8, enforce_eager=False, seed=0)
    startup = time.perf_counter() - t0
    prompts = [{"prompt_token_ids": p} for p in json.loads(args.prompts)]
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True, detokenize=False)
    outs = llm.generate(prompts, params, use_tqdm=False)
    result = {"tokens": [list(o.outputs[0].token_ids) for o in outs], "startup_s": startup}
    if args.bench:
        bench = [{"prompt_token_ids": [(7 * i + j) % 500 + 1 for j in range(16)]} for i in range(args.bench)]
        params = SamplingParams(temperature=0.0, max_tokens=args.bench_tokens, ignore_eos=True, detokenize=False)
        llm.generate(bench[:2], params, use_tqdm=False)  # warm
        t0 = time.perf_counter()
        outs = llm.generate(bench, params, use_tqdm=False)
        dt = time.perf_counter() - t0
        n = sum(len(o.outputs[0].token_ids) for o in outs)
        result["bench"] = {"requests": args.bench, "tokens": n, "seconds": dt, "tokens_per_s": n / dt}
    with open(args.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
