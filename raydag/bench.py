"""Benchmarks that compare side by side in one run; ``make bench`` runs them.

``python -m raydag.bench serve`` (``make bench-serve``) loads the scoring endpoint with
concurrent clients and compares it with offline scoring by the same engine (see
:mod:`raydag.bench_serve`).

``python -m raydag.bench students`` (``make bench-students``) trains the raw student on 100 rows
of each benchmark dataset, once per seed, beside its linear probe and the majority class (see
:mod:`raydag.bench_students`).

``python -m raydag.bench minhash`` times the near-duplicate pass (MinHash signatures in Ray
Data, LSH on the driver, marking) on 100,000 rows and prints ``minhash_rows_per_s=<number>``.

``python -m raydag.bench scale`` (``make bench-scale``) runs a real label job over 10,000,
100,000 and 1,000,000 rows on the instant benchmark engine beside a bare Ray Data pipeline,
and prints the rows per second and the driver's peak RSS of each (see :mod:`raydag.bench_scale`).

``python -m raydag.bench teacher`` measures the teacher stage (Ray Data -> ChainRunner actor
-> vLLM, exactly as ``raydag run`` builds it) against plain ``vllm.LLM.generate`` given all of a
round's prompts in one call (``plain_calls=1``), on the same model, the same prompts and the
same sampling settings, for two workloads: the quickstart requests and a long tail (each
request asks for 1 to 16 list items of 16 tokens, so ``max_tokens`` runs from 16 to 256). It
ends with ``teacher_vs_vllm_ratio=<ours / plain output tokens per second>`` and
``teacher_vs_vllm_longtail_ratio=<the same on the long tail>``.
Engine start-up is left out of both sides; Ray Data's own overhead between batches is counted.
Both sides run with the same local Ray up (its daemons share the cores), so the ratio measures
what the stage itself costs. The requests are split into paired rounds (each side on the same
slice, back to back, each with a fresh engine) and the ratio is the median of the rounds' ratios,
so that a shared host's drift between minutes does not land on one side.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from pathlib import Path

from raydag.engines.vllm import CPU_BLOCK_SIZE
from raydag.resources import teacher_dtype

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "jobs" / "quickstart.yaml"


# The long-tail workload: 16 tokens per list item, 1 to 16 items per request, so max_tokens
# runs from 16 to 256 (the model may stop earlier: ignore_eos stays off).
LONGTAIL_TOKENS_PER_ITEM = 16
LONGTAIL_MAX_ITEMS = 16


def _plan(num_requests: int, batch_size: int, seed: int = 0, longtail: bool = False,
          engine_pool: str = "auto"):
    """The quickstart's few-shot create requests; ``longtail``: each asks for 1 to 16 list
    items of at most 16 tokens (a spread of ``max_tokens`` from 16 to 256, in a fixed
    interleaved order), through the create stage's own multi-item requests. ``engine_pool``:
    the job's ``teacher.engine_pool`` (where our side's engines live)."""
    from raydag.chain import create_op
    from raydag.config import load_job
    from raydag.data import raw_row_id

    overrides = [f"teacher.batch_size={batch_size}", f"teacher.engine_pool={engine_pool}"]
    if longtail:
        overrides.append(f"stages.0.sampling.max_tokens={LONGTAIL_TOKENS_PER_ITEM}")
    job = load_job(QUICKSTART, overrides)
    rows = [json.loads(line) for line in Path(job.data.train_path).read_text().splitlines()]
    raw = [{"id": raw_row_id(r["text"], r["label"]), **r} for r in rows[:100]]
    op = create_op(job)
    plan = op.plan_requests(raw, num_requests, seed)
    if longtail:
        for index, row in enumerate(plan):
            row["request_items"] = 1 + (index * 7) % LONGTAIL_MAX_ITEMS
    return job, op, plan


def _plain_vllm(job, op, plan) -> dict:
    """Plain ``vllm.LLM.generate`` in this process, with the same ``vllm.LLM`` arguments as
    ours; a fresh engine, like ours (no prefix cache carried over from an earlier round). All
    the prompts go in one call, as ``vllm bench throughput`` gives them: the engine batches
    them continuously, with no wait for a batch's longest generation."""
    from raydag.engines.vllm import engine_args

    args = engine_args(job.teacher.model, dtype=job.teacher.dtype,  # before vllm is imported
                       max_model_len=job.teacher.max_model_len, seed=job.seed,
                       cpu_kv_cache_gib=job.teacher.cpu_kv_cache_gib)
    from vllm import LLM, SamplingParams

    llm = LLM(**args)
    tokenizer = llm.get_tokenizer()
    requests = [op.build_requests(row)[0] for row in plan]
    prompts = [tokenizer.apply_chat_template(list(r.messages), tokenize=False,
                                             continue_final_message=True) for r in requests]
    params = [SamplingParams(max_tokens=r.max_tokens, temperature=r.temperature, top_p=r.top_p,
                             seed=r.seed, stop=list(r.stop)) for r in requests]
    started = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - started
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    del llm
    gc.collect()
    return {"tokens_out": tokens, "seconds": seconds}


def _ours(job, op, plan) -> dict:
    """The teacher stage exactly as `raydag run` builds it (:func:`raydag.teacher.generate`):
    shards through ChainRunner actors, parsed, lineage added and written as Parquet; the
    engines in a job's engine pool where the job's ``teacher.engine_pool`` puts them there."""
    import tempfile

    import ray

    from raydag.chain import shard_rows
    from raydag.resources import init_ray, plan_placement
    from raydag.teacher import engine_pool, generate
    from raydag.stages import Step, with_status

    placement = plan_placement(job, init_ray())
    pool = placement["engine_pool"] = engine_pool(job, placement)
    shards = shard_rows(with_status(plan), job.teacher.batch_size)
    wall_started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as shard_dir:
            summaries = generate(ray.data.from_items(shards), [Step(name=f"1:{op.name}", op=op)],
                                 job, placement, Path(shard_dir)).to_pandas()
    finally:
        if pool is not None:
            pool.stop()
    # From the first shard's start to the last shard's end: engine start-up excluded; parsing,
    # writing and Ray Data's hand-offs between shards included.
    window = float((summaries["started_at"] + summaries["seconds"]).max() - summaries["started_at"].min())
    tokens = sum(json.loads(stats)[0]["tokens_out"] for stats in summaries["stats"])
    return {"tokens_out": tokens, "seconds": window, "wall": time.perf_counter() - wall_started}


def _ray_data_llm(job, op, plan, batch_size: int) -> dict:
    """The same requests through ``ray.data.llm`` (Ray's own vLLM batch processor)."""
    import ray
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig
    from transformers import AutoTokenizer

    from raydag.models import resolve_model
    from raydag.resources import init_ray

    init_ray()
    path = resolve_model(job.teacher.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    rows = []
    for row in plan:
        r = op.build_requests(row)[0]
        rows.append({
            "prompt": tokenizer.apply_chat_template(list(r.messages), tokenize=False,
                                                    continue_final_message=True),
            "sampling_params": {"max_tokens": r.max_tokens, "temperature": r.temperature,
                                "top_p": r.top_p, "seed": r.seed, "stop": list(r.stop)},
        })
    config = vLLMEngineProcessorConfig(
        model_source=path,
        engine_kwargs={"dtype": teacher_dtype(job.teacher.dtype, on_gpu=False)[0], "max_model_len": job.teacher.max_model_len,
                       "enforce_eager": True, "enable_chunked_prefill": False,
                       "max_num_batched_tokens": 8192, "seed": job.seed,
                       "enable_prefix_caching": True, "block_size": CPU_BLOCK_SIZE},
        runtime_env={"env_vars": {"VLLM_CPU_KVCACHE_SPACE": str(job.teacher.cpu_kv_cache_gib)}},
        # Without a CPU bundle it asks for a GPU and waits forever on a CPU host.
        placement_group_config={"bundles": [{"CPU": 1}]},
        concurrency=1, batch_size=batch_size, chat_template_stage=False,
    )
    processor = build_processor(
        config, preprocess=lambda row: row,
        postprocess=lambda row: {"tokens_out": len(row["generated_tokens"])})
    started = time.perf_counter()
    out = processor(ray.data.from_items(rows)).to_pandas()
    return {"tokens_out": int(out["tokens_out"].sum()), "seconds": time.perf_counter() - started}


def _paired_rounds(job, op, plan, rounds: int) -> dict:
    """Each slice of ``plan`` on both sides back to back (alternating which goes first); the
    per-round ratios (ours / plain output tokens per second) and each side's totals."""
    per_round = -(-len(plan) // rounds)
    totals = {"plain": [0, 0.0], "ours": [0, 0.0]}
    ratios, ours_wall = [], 0.0
    for index in range(rounds):
        part = plan[index * per_round : (index + 1) * per_round]
        if not part:
            break
        result = {}
        for name in ("plain", "ours") if index % 2 == 0 else ("ours", "plain"):
            result[name] = _plain_vllm(job, op, part) if name == "plain" else _ours(job, op, part)
            totals[name][0] += result[name]["tokens_out"]
            totals[name][1] += result[name]["seconds"]
        ours_wall += result["ours"]["wall"]
        tps = {name: r["tokens_out"] / r["seconds"] for name, r in result.items()}
        ratios.append(tps["ours"] / tps["plain"])
        print(f"round {index + 1}/{rounds}: {len(part)} requests, plain {tps['plain']:.1f} tok/s, "
              f"ours {tps['ours']:.1f} tok/s, ratio {ratios[-1]:.3f}", flush=True)
    return {"ratios": ratios, "totals": totals, "ours_wall": ours_wall}


def bench_teacher(num_requests: int, batch_size: int, rounds: int = 3,
                  with_ray_data_llm: bool = False, engine_pool: bool = False) -> dict[str, float]:
    """Print both throughputs and their ratio for two workloads, the quickstart requests and a
    long tail (``max_tokens`` from 16 to 256); return the ratios.

    The requests are split into ``rounds`` slices; each slice runs on both sides back to back
    (alternating which goes first), and the ratio is the median of the per-slice ratios. Pairing
    in time keeps a shared host's drift (measured here: plain alone varied 85-107 tok/s between
    runs minutes apart) out of the ratio. ``engine_pool``: our side's engines in a job's engine
    pool (:func:`raydag.teacher.engine_pool`) instead of the stage's actors.
    """
    import statistics

    from raydag.resources import init_ray

    init_ray()
    ratios = {}
    for workload, key in (("quickstart", "teacher_vs_vllm_ratio"),
                          ("longtail", "teacher_vs_vllm_longtail_ratio")):
        job, op, plan = _plan(num_requests, batch_size, longtail=workload == "longtail",
                              engine_pool="job" if engine_pool else "auto")
        print(f"teacher benchmark, {workload}: {num_requests} few-shot requests in {rounds} "
              f"paired rounds, ours in batches of {batch_size}, plain vLLM given each round's "
              f"requests in one generate call, model {job.teacher.model}", flush=True)
        print("plain_calls=1", flush=True)
        found = _paired_rounds(job, op, plan, rounds)
        for name, label in (("plain", "plain_vllm"), ("ours", "raydag_teacher")):
            tokens, seconds = found["totals"][name]
            print(f"{workload}_{label}_tokens_per_s={tokens / seconds:.1f} "
                  f"(tokens {tokens}, {seconds:.1f}s)")
        print(f"{workload}_raydag_teacher_wall_s={found['ours_wall']:.1f} (engine start-up included)")
        runs = found["ratios"]
        ratios[key] = statistics.median(runs)
        print(f"{key}={ratios[key]:.3f} (median of {len(runs)} paired rounds; "
              f"min {min(runs):.3f}, max {max(runs):.3f})", flush=True)
        if with_ray_data_llm and workload == "quickstart":
            other = _ray_data_llm(job, op, plan, batch_size)
            print(f"ray_data_llm_tokens_per_s={other['tokens_out'] / other['seconds']:.1f} "
                  f"(tokens {other['tokens_out']}, {other['seconds']:.1f}s, engine start-up "
                  "included)")
            print(f"raydag_vs_ray_data_llm_wall_ratio={other['seconds'] / found['ours_wall']:.3f}",
                  flush=True)
    print(f"teacher_vs_vllm_ratio={ratios['teacher_vs_vllm_ratio']:.3f} "
          f"teacher_vs_vllm_longtail_ratio={ratios['teacher_vs_vllm_longtail_ratio']:.3f}",
          flush=True)
    return ratios


def main(argv: list[str] | None = None) -> int:
    """``python -m raydag.bench teacher [--requests N] [--batch-size B]``."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["scale"]:  # its own options: python -m raydag.bench scale --help
        from raydag.bench_scale import main as bench_scale

        return bench_scale(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m raydag.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", choices=["teacher", "minhash", "serve", "students", "scale"],
                        help="teacher: the teacher stage against plain vLLM; minhash: MinHash "
                        "near-duplicate marking throughput (see raydag.bench_minhash); serve: "
                        "the scoring endpoint under load against offline scoring (see "
                        "raydag.bench_serve); students: the student recipe against its "
                        "baselines on benchmark datasets (see raydag.bench_students); scale: "
                        "a real job over 10k-1M rows on the instant engine against bare Ray "
                        "Data (see raydag.bench_scale; `scale --help` for its options)")
    parser.add_argument("--clients", type=int, default=32, help="serve: concurrent clients (32)")
    parser.add_argument("--seconds", type=float, default=60, help="serve: load duration (60)")
    parser.add_argument("--items-per-request", type=int, default=1,
                        help="serve: items per request (1)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="serve: overrides of jobs/judge.yaml, e.g. serve.max_batch_size=64; "
                        "students: of the student recipe, e.g. student.learning_rate=1e-4")
    parser.add_argument("--datasets", default="sst2,emotion,rte,agnews",
                        help="students: dataset folders under --data (sst2,emotion,rte,agnews)")
    parser.add_argument("--data", default=None, help="students: where the datasets are "
                        "($RAYDAG_BENCH_DATA or ../shared/data)")
    parser.add_argument("--raw-examples", type=int, default=100, help="students: raw rows (100)")
    parser.add_argument("--seeds", default="0,1,2", help="students: seeds (0,1,2)")
    parser.add_argument("--max-test", type=int, default=None,
                        help="students: most test rows per dataset (stratified; all by default)")
    parser.add_argument("--rows", type=int, default=100_000, help="minhash: rows (100000)")
    parser.add_argument("--requests", type=int, default=384, help="requests per side (384)")
    parser.add_argument("--batch-size", type=int, default=64, help="requests per batch (64)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="paired rounds the requests are split into (3)")
    parser.add_argument("--with-ray-data-llm", action="store_true",
                        help="also run the requests through ray.data.llm and compare wall times")
    parser.add_argument("--engine-pool", action="store_true",
                        help="teacher: our engines in a job's engine pool (Ray Serve replicas, "
                        "as jobs with several teacher passes run them) instead of the stage's "
                        "actors")
    args = parser.parse_intermixed_args(argv)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # the plain side's engine logs here
    if args.which == "minhash":
        from raydag.bench_minhash import bench_minhash

        bench_minhash(args.rows)
        return 0
    if args.which == "students":
        from raydag.bench_students import DEFAULT_DATA, bench_students

        data = Path(args.data) if args.data else DEFAULT_DATA
        if not data.is_dir():
            parser.error(f"no benchmark datasets at {data} (set --data or RAYDAG_BENCH_DATA)")
        bench_students(args.datasets.split(","), data, args.raw_examples,
                       [int(s) for s in args.seeds.split(",")], args.overrides, args.max_test)
        return 0
    if args.which == "serve":
        from raydag.bench_serve import bench_serve

        bench_serve(args.clients, args.seconds, args.items_per_request, overrides=args.overrides)
        return 0
    bench_teacher(args.requests, args.batch_size, args.rounds, args.with_ray_data_llm,
                  args.engine_pool)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
