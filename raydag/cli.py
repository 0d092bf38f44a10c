"""The ``raydag`` command line."""

from __future__ import annotations

import argparse
import os
import sys

from raydag.errors import JobInterrupted, RaydagError

EPILOG = """examples:
  raydag run jobs/quickstart.yaml
  raydag run jobs/quickstart.yaml stages.0.num_examples=200 "student.seeds=[0,1,2]"
  raydag run jobs/multistage.yaml budget.max_tokens=200000
  raydag validate jobs/label_unlabelled.yaml
  raydag study jobs/study.yaml                       # the seed study's grid (resumable)
  raydag study jobs/study.yaml --plan                # list its cells and what each trains
  raydag import-labels jobs/coannotate.yaml label_studio_export.json
  raydag serve jobs/judge.yaml                       # scoring endpoint on 127.0.0.1:8000
  raydag submit jobs/quickstart.yaml --address http://HEAD:8265
  raydag status|logs|stop JOB_ID --address http://HEAD:8265

Overrides are dotted keys of the job YAML (list items by index: stages.0.method=one_shot);
values are parsed as YAML (numbers, lists, true). Rerunning a job with the same result settings
resumes it: finished shards under output_dir/runs/<signature>/ are skipped.

Set RAY_ADDRESS to run (or serve) on an existing Ray cluster instead of a local one."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every sub-command."""
    parser = argparse.ArgumentParser(
        prog="raydag",
        description="LLM data augmentation on Ray: a teacher LLM creates training data, "
        "students fine-tune on it.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run",
        help="run a job: sample raw rows, run the teacher stages, write shards, train and "
        "evaluate students beside their baselines",
        description="Run a job end to end (resuming an interrupted run of the same settings). "
        "The terminal shows raydag's own lines (stages, progress, warnings, the students' "
        "scores (mean ± sd over student.seeds) beside their linear probe and majority class, "
        "the table and, last, the report path); everything the libraries print goes to "
        "output_dir/logs/run-<time>.log. Bad input stops the run before any generation with "
        "'raydag: error: <file>:<line>: <reason>' and exit code 2. Ctrl-C or SIGTERM stops it "
        "cleanly: finished shards are kept, a report marked partial is written, and the exit "
        "code is 130 (SIGINT) or 143 (SIGTERM); rerun to resume. A job with a loop: section "
        "runs rounds of creation, each an ordinary job in output_dir/rounds/<k>, steered by "
        "the mixed student's mistakes on dev rows, and with loop.strategies uncertainty the "
        "teacher labels the pool texts (data.unlabelled_path) the student is least sure of "
        "(README: The closed loop).",
    )
    validate = sub.add_parser(
        "validate", help="check a job file, its data and its output folder without running it",
        description="Load the job strictly, apply overrides, check the data files and that the "
        "output folder is writable and raydag's to use.",
    )
    study = sub.add_parser(
        "study", help="run the seed study: a grid of jobs over datasets, creation methods, "
        "sizes and seeds, then study.json, study.md and plots",
        description="Expand the study YAML into cells (datasets x creation methods, the sweeps "
        "over synthetic and raw sizes, the teacher as a classifier; the method loop is a closed "
        "loop with its one-pass baseline) and run each cell not yet "
        "finished as an ordinary job under output_dir/cells/<cell>/ (job.yaml there; a stopped "
        "study goes on where it stopped). After each cell, write output_dir/study.json, study.md "
        "(tables, time per cell, and for each finding of the seed study whether it held, with "
        "the numbers) and PNG plots from the cells finished so far. A failed cell is reported and the others still run (exit 2). "
        "Cells run in turn; with parallel_cells=K, up to K side by side as Ray tasks on this node "
        "(for a cluster with room for several cells' teachers and students).")
    study.add_argument("study", help="study YAML file, e.g. jobs/study.yaml")
    study.add_argument("overrides", nargs="*", metavar="key=value",
                       help="override a study field, e.g. seeds=[0] or \"overrides=[student.min_steps=30]\"")
    study.add_argument("--plan", action="store_true", help="print the cells and exit (nothing runs)")
    study.add_argument("--only", action="append", default=[], metavar="GLOB",
                       help="run only the cells whose names match (repeatable), e.g. --only "
                       "'agnews.*'; --plan lists the names. Outputs still cover every finished cell")
    study.add_argument("--report", action="store_true",
                       help="run no cell: write study.json, study.md and the plots from the cells "
                       "finished so far")
    labels = sub.add_parser(
        "import-labels", help="merge labels returned from Label Studio into a run's human queue",
        description="Read a Label Studio JSON export of the tasks a run put in its human queue "
        "(runs/<signature>/human_queue/tasks.json) and store the labels, with annotator and "
        "time, in runs/<signature>/human_labels.parquet. The next `raydag run` of the same job "
        "(same overrides) reuses every shard and merges them: those rows are accepted with the "
        "human's label (label_source=human, teacher_label kept).",
    )
    labels.add_argument("job", help="the job YAML the run came from")
    labels.add_argument("export", help="Label Studio export (JSON)")
    served = sub.add_parser(
        "serve", help="serve the job's judge stage as an HTTP scoring endpoint on Ray Serve",
        description="Deploy the job's judge stage (serve.stage, else the first judge stage) on "
        "Ray Serve: POST /v1/score, GET /healthz, GET /metrics. Binds serve.host (127.0.0.1 "
        "unless configured) and serve.port; batching, limits, token and replica autoscaling "
        "come from the job's serve section. Runs until Ctrl-C, then removes the endpoint.")
    served.add_argument("--host", help="bind this address instead of serve.host")
    served.add_argument("--port", type=int, help="listen on this port instead of serve.port")
    served.add_argument("--detach", action="store_true",
                        help="deploy and exit, leaving the endpoint on the cluster (with RAY_ADDRESS)")
    submit = sub.add_parser(
        "submit", help="submit a job to a Ray cluster through the Ray Jobs API",
        description="Check the job file, upload the working directory as the job's runtime "
        "environment (with --pip requirements) and run `python -m raydag.cli run JOB` on the "
        "cluster. Prints the job id on stdout; follow it with `raydag logs ID --follow`. A "
        "relative output_dir lands in the job's working directory on the cluster: give an "
        "absolute path on shared storage to keep the results.")
    submit.add_argument("--working-dir", default=".",
                        help="folder uploaded to the cluster (default: .); must contain the job file")
    submit.add_argument("--pip", action="append", default=[], metavar="REQUIREMENT",
                        help="pip requirement installed for the job (repeatable)")
    submit.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment variable for the job (repeatable)")
    for p in (run, validate, study):
        p.add_argument("--verbose", "-v", action="store_true",
                       help="also show Ray's, vLLM's, DeepSpeed's and transformers' output live "
                       "(it always goes to output_dir/logs/)")
    for p in (run, validate, labels, served, submit):
        if p is not labels:
            p.add_argument("job", help="job YAML file, e.g. jobs/quickstart.yaml")
        p.add_argument("overrides", nargs="*", metavar="key=value",
                       help="override a job field, e.g. stages.0.num_examples=50")
    for name, text in (("status", "show a submitted job's status"),
                       ("logs", "print a submitted job's logs"),
                       ("stop", "stop a submitted job")):
        p = sub.add_parser(name, help=text, description=text + " (Ray Jobs API).")
        p.add_argument("job_id", help="the id `raydag submit` printed")
        if name == "logs":
            p.add_argument("--follow", "-f", action="store_true", help="stream until the job ends")
    for p in (submit, *(sub.choices[n] for n in ("status", "logs", "stop"))):
        p.add_argument("--address", help="the cluster's dashboard URL (default: RAY_ADDRESS "
                       "if it is a URL, else http://127.0.0.1:8265)")
    return parser


def _jobs_command(args: argparse.Namespace) -> int:
    """``submit``, ``status``, ``logs``, ``stop``: the Ray Jobs API (no local Ray started)."""
    from raydag import submit as jobs

    if args.command == "submit":
        env = {}
        for pair in args.env:
            key, sep, value = pair.partition("=")
            if not sep or not key:
                raise RaydagError(f"--env expects KEY=VALUE, got {pair!r}")
            env[key] = value
        job_id = jobs.submit(args.job, args.overrides, args.address, args.working_dir,
                             args.pip, env)
        print(f"raydag: submitted {args.job} to {jobs.job_address(args.address)}; follow it "
              f"with `raydag logs {job_id} --follow`", file=sys.stderr)
        print(job_id)
        return 0
    if args.command == "status":
        info = jobs.status(args.job_id, args.address)
        print(f"{info['job_id']}: {info['status']}" + (f" ({info['message']})" if info["message"] else ""))
        return 0
    if args.command == "logs":
        text = jobs.logs(args.job_id, args.address, follow=args.follow, out=sys.stdout)
        if text is not None:
            sys.stdout.write(text)
        return 0
    stopped = jobs.stop(args.job_id, args.address)
    print(f"{args.job_id}: " + ("stop requested" if stopped else "already finished"))
    return 0


def _serve(args: argparse.Namespace, job) -> int:
    """``raydag serve``: deploy, print the URL, wait for Ctrl-C, remove the endpoint."""
    import time

    from ray import serve

    from raydag.resources import init_ray
    from raydag.serve import APP_NAME, start

    init_ray()
    url = start(job, host=args.host, port=args.port)
    print(f"raydag: judge of '{job.name}' serving at {url}/v1/score (health: {url}/healthz, "
          f"metrics: {url}/metrics)", flush=True)
    if args.detach:
        return 0
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("raydag: stopping the endpoint", file=sys.stderr)
        serve.delete(APP_NAME)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``raydag`` console script."""
    args = build_parser().parse_args(argv)
    if not os.environ.get("RAY_ADDRESS"):
        # The in-process Ray this command starts serves this machine only: its servers bind
        # 127.0.0.1 (read when ray is first imported, hence here).
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if args.command in ("submit", "status", "logs", "stop"):
        try:
            return _jobs_command(args)
        except RaydagError as err:
            print(f"raydag: error: {err}", file=sys.stderr)
            return 2
    import ray

    from raydag.config import load_job

    owns_ray = not ray.is_initialized()  # a library caller's Ray is left running

    try:
        if args.command == "study":
            return _study(args, owns_ray)
        job = load_job(args.job, args.overrides)
        if args.command == "serve":
            return _serve(args, job)
        if args.command == "import-labels":
            from pathlib import Path

            from raydag.outputs import existing_run_dir
            from raydag.quality import import_labels

            run_dir = existing_run_dir(job)
            counts = import_labels(run_dir, Path(args.export), job.data.labels)
            print(f"{args.export}: {counts['labelled']} label(s) from {counts['tasks']} task(s) "
                  f"({counts['skipped_unannotated']} unannotated, {counts['cancelled']} cancelled); "
                  f"{counts['stored']} human label(s) stored in {run_dir}. Run `raydag run "
                  f"{args.job}` with the same overrides to apply them.")
            return 0
        if args.command in ("run", "validate"):
            return _run_or_validate(args, job, owns_ray)
        raise RaydagError(f"unknown command {args.command}")  # pragma: no cover - argparse
    except RaydagError as err:
        print(f"raydag: error: {err}", file=sys.stderr)
        return 2


def _study(args: argparse.Namespace, owns_ray: bool) -> int:
    """``raydag study``: plan, or run the cells in turn and write the study's outputs."""

    import ray

    from raydag import console
    from raydag.config import load_study
    from raydag.outputs import claim_output_dir
    from raydag.study import plan_cells, run_study, select_cells

    study = load_study(args.study, args.overrides)
    if args.plan:
        try:
            cells = select_cells(plan_cells(study), args.only)
        except RaydagError as err:
            print(f"raydag: error: {err}", file=sys.stderr)
            return 2
        for cell in cells:
            what = (f"teacher labels the test sample ({cell.shots} shot(s) per label)"
                    if cell.kind == "teacher" else
                    f"{cell.method} M={cell.num_examples} N={cell.raw_examples}; students "
                    f"{', '.join(cell.train_sets) or '-'} x seeds {study.seeds}")
            print(f"{cell.name}: {what}")
        return 0
    out = claim_output_dir(study.output_dir)
    log = console.new_log_file(out, "study")
    with console.capture(log, verbose=args.verbose):
        console.say(f"study {args.study}: library output goes to {log}")
        try:
            path = run_study(study, run=not args.report, only=args.only)
        except RaydagError as err:
            console.error(f"raydag: error: {err}")
            return 2
        except KeyboardInterrupt:
            console.error("raydag: interrupted; finished cells and shards are kept (rerun to resume)")
            return 130
        finally:
            if owns_ray and ray.is_initialized():
                ray.shutdown()
        console.show(str(path.parent / "study.md"))
    return 0


def _run_or_validate(args: argparse.Namespace, job, owns_ray: bool) -> int:
    """``raydag run`` and ``raydag validate``: raydag's lines on the terminal, everything the
    libraries print in ``output_dir/logs/<command>-<time>.log`` (live too with --verbose)."""
    import traceback

    import ray

    from raydag import console
    from raydag.outputs import claim_output_dir
    from raydag.pipeline import run_job, validate_job
    from raydag.storage import display

    out = claim_output_dir(job.output_dir)
    log = console.new_log_file(out, args.command)  # a store's output_dir: logs stay on this host
    with console.capture(log, verbose=args.verbose):
        console.say(f"{args.command} {args.job}: library output goes to {log}"
                    + (" (shown live: --verbose)" if args.verbose else " (--verbose shows it)"))
        try:
            if args.command == "validate":
                counts = validate_job(job)
                console.show(f"{args.job}: ok (job '{job.name}', pool {counts.get('pool', 0)} rows, "
                             f"test {counts.get('test', 0)} rows"
                             + (f", {counts['bad_rows']} bad row(s) data.on_bad_rows=skip would "
                                "leave out" if counts.get("bad_rows") else "") + ")")
                return 0
            path = run_job(job)
            if owns_ray:
                ray.shutdown()  # so no late log line of Ray's workers follows the report path
        except JobInterrupted as err:
            console.error(f"raydag: stopped by {err.signal_name}; finished shards are kept "
                          "(rerun to resume)" + (f"; partial report: {display(err.report)}"
                                                 if err.report else "") + f". Log: {log}")
            return err.exit_code
        except RaydagError as err:
            lines = str(err).splitlines() or [type(err).__name__]
            console.error("\n".join([f"raydag: error: {lines[0]}", *lines[1:15]]))
            console.error(f"raydag: the full log is {log}")
            return 2
        except KeyboardInterrupt:
            console.error(f"raydag: interrupted; finished shards are kept (rerun to resume). "
                          f"Log: {log}")
            return 130
        except Exception as err:  # an unexpected failure: the cause here, the traceback in the log
            traceback.print_exc()  # goes to the log
            first = (str(err).strip().splitlines() or [""])[-1][:300]
            console.error(f"raydag: error: {type(err).__name__}: {first}")
            console.error(f"raydag: the traceback and the full log are in {log}")
            return 1
        console.show(display(path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
