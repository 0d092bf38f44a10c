"""The ``raydag`` command line."""

from __future__ import annotations

import argparse
import sys

from raydag.errors import RaydagError

EPILOG = """examples:
  raydag run jobs/quickstart.yaml
  raydag run jobs/quickstart.yaml stages.0.num_examples=200 student.epochs=3
  raydag run jobs/multistage.yaml budget.max_tokens=200000
  raydag validate jobs/label_unlabelled.yaml
  raydag import-labels jobs/coannotate.yaml label_studio_export.json

Overrides are dotted keys of the job YAML (list items by index: stages.0.method=one_shot);
values are parsed as YAML (numbers, lists, true). Rerunning a job with the same result settings
resumes it: finished shards under output_dir/runs/<signature>/ are skipped.

Set RAY_ADDRESS to run on an existing Ray cluster instead of a local one."""


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
        "evaluate students",
        description="Run a job end to end (resuming an interrupted run of the same settings); "
        "prints the students' table and, as its last line, the report path.",
    )
    validate = sub.add_parser(
        "validate", help="check a job file, its data and its output folder without running it",
        description="Load the job strictly, apply overrides, check the data files and that the "
        "output folder is writable and raydag's to use.",
    )
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
    for p in (run, validate, labels):
        if p is not labels:
            p.add_argument("job", help="job YAML file, e.g. jobs/quickstart.yaml")
        p.add_argument("overrides", nargs="*", metavar="key=value",
                       help="override a job field, e.g. stages.0.num_examples=50")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``raydag`` console script."""
    args = build_parser().parse_args(argv)
    import ray

    from raydag.config import load_job

    owns_ray = not ray.is_initialized()  # a library caller's Ray is left running

    try:
        job = load_job(args.job, args.overrides)
        if args.command == "validate":
            from raydag.pipeline import validate_job

            counts = validate_job(job)
            print(f"{args.job}: ok (job '{job.name}', pool {counts['pool']} rows, "
                  f"test {counts['test']} rows)")
            return 0
        if args.command == "import-labels":
            from pathlib import Path

            from raydag.chain import run_signature
            from raydag.pipeline import input_digests
            from raydag.quality import import_labels

            signature, _ = run_signature(job, input_digests(job))
            run_dir = Path(job.output_dir) / "runs" / signature
            counts = import_labels(run_dir, Path(args.export), job.data.labels)
            print(f"{args.export}: {counts['labelled']} label(s) from {counts['tasks']} task(s) "
                  f"({counts['skipped_unannotated']} unannotated, {counts['cancelled']} cancelled); "
                  f"{counts['stored']} human label(s) stored in {run_dir}. Run `raydag run "
                  f"{args.job}` with the same overrides to apply them.")
            return 0
        from raydag.pipeline import run_job

        path = run_job(job)
        if owns_ray:
            ray.shutdown()  # so no late log line of Ray's workers follows the report path
        print(path)
        return 0
    except RaydagError as err:
        print(f"raydag: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
