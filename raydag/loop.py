"""The closed loop: rounds of creation steered by the student's mistakes.

One-pass generation writes a prompt, makes N rows, filters and trains. Here the synthetic
budget is spread over ``loop.rounds`` rounds, and after each round the mixed student (raw rows
plus every row accepted so far) trains on every seed of ``student.seeds``. Where it is weak on
dev rows it did not train on (per-class F1, confused pairs, the rows it got wrong; see
:func:`raydag.evaluate.weaknesses`) steers the next round (:func:`steering`): more requests
for weak classes and the classes of confused pairs, and the misclassified rows as the first
demonstration of their label. This is S3's idea (Wang et al., 2023) in raydag's recipe.
With ``uncertainty`` and a pool of unlabelled texts (``data.unlabelled_path``), a share of each
later round is the teacher labelling the pool texts the students are least sure of (uncertainty
sampling, the active-learning criterion Kessler et al., 2025 found strongest for a fixed teacher
budget): an ordinary label job in ``rounds/<k>/uncertain``.

Each round is an ordinary job in ``<output_dir>/rounds/<k>``: the same job with ``stages.0``
planned for the round (``round``, ``num_examples`` and the steering fields of
:class:`raydag.config.CreateStage`), so it has its own report and resumes like any job. Rows
carry ``round`` and ``steer`` (why they were asked for). A finished round, and the students
trained after it (``rounds/<k>/students.json``), are reused by a rerun; a rerun with more
rounds goes on from the last one. Exact and near duplicates across rounds are dropped before
the students train, the earlier round's copy kept.

The dev rows are ``data.dev_path`` or, per seed, the share of the raw sample the student held
out (``student.dev_fraction``); never the test split.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd

from raydag import console
from raydag.config import JobConfig
from raydag.data import stable_hash
from raydag.ops.create import label_weights
from raydag.storage import RunPath, display, location, read_dataset, write_atomically

ROUNDS = "rounds"
ONE_PASS = "one_pass"
UNCERTAIN = "uncertain"
_STUDENT_KEYS = ("accuracy", "accuracy_std", "macro_f1", "macro_f1_std", "seeds", "per_class_f1",
                 "probe", "majority", "train_examples", "flags")
_ROUND_ORDER = 10 ** 12  # a round's rows sort after every earlier round's (its _order plus k x this)


def round_sizes(job: JobConfig) -> list[int]:
    """Examples asked for in each round: ``loop.per_round``, or ``stages.0.num_examples``
    spread over the rounds, the earlier rounds taking the remainder."""
    loop, first = job.loop, job.stages[0]
    if loop.per_round is not None:
        return [loop.per_round] * loop.rounds
    base, extra = divmod(first.num_examples, loop.rounds)
    return [base + (k < extra) for k in range(loop.rounds)]


def steering(job: JobConfig, weak: dict[str, Any] | None,
             rows: dict[str, dict[str, str]]) -> dict[str, Any]:
    """How the next round is steered by the student's weaknesses (``None``: the first round,
    not steered).

    - ``label_shift``: ``loop.shift`` of the requests go by weakness, the rest as the stage
      plans them. A label's weakness is ``1 - F1`` on the dev rows (the mean of the others
      where no dev row has it) plus its share of the misclassified rows in the most confused
      pairs (half that for the label they were mistaken for). Labels asked for more than
      before are named in ``steer``: ``confused:<true>-><predicted>`` (its most confused pair)
      or ``weak_class:<label>``.
    - ``hard_examples``: up to ``loop.max_hard_examples`` of the rows the student got wrong,
      most confidently wrong first, for one- and few-shot creation.

    Args:
        job: The loop's job.
        weak: :func:`raydag.evaluate.weaknesses` of the last round's students.
        rows: The dev rows by id (``text``, ``label``), to show the hard examples.

    Returns:
        ``label_distribution`` (None: as planned), ``steer`` (label -> reason),
        ``hard_examples`` (rows with ``id``, ``text``, ``label``) and ``uncertain`` (empty:
        the loop fills it with :func:`uncertain_texts`).
    """
    first, loop, labels = job.stages[0], job.loop, job.data.labels
    out: dict[str, Any] = {"label_distribution": first.label_distribution, "steer": {},
                           "hard_examples": [], "uncertain": []}
    if weak is None:
        return out
    planned = np.array(list(label_weights(labels, first.label_distribution).values()))
    planned /= planned.sum()
    if "label_shift" in loop.strategies and weak["rows"]:
        f1 = weak["per_class_f1"]
        known = [1.0 - f1[y] for y in labels if y in f1]
        score = np.array([1.0 - f1[y] if y in f1 else float(np.mean(known)) for y in labels])
        pairs = weak["confused_pairs"]
        wrong = sum(p["rows"] for p in pairs)
        for pair in pairs:  # the class read wrongly needs the most, the one it was read as some
            score[labels.index(pair["true"])] += pair["rows"] / wrong
            score[labels.index(pair["predicted"])] += 0.5 * pair["rows"] / wrong
        if score.sum() > 0:
            shares = (1 - loop.shift) * planned + loop.shift * score / score.sum()
            out["label_distribution"] = {y: round(float(s), 4) for y, s in zip(labels, shares)}
            for y, share, before in zip(labels, shares, planned):
                if share > before + 1e-9:
                    pair = next((p for p in pairs if y in (p["true"], p["predicted"])), None)
                    out["steer"][y] = (f"confused:{pair['true']}->{pair['predicted']}" if pair
                                       else f"weak_class:{y}")
    if "hard_examples" in loop.strategies and first.method in ("one_shot", "few_shot"):
        out["hard_examples"] = [{"id": i, "text": rows[i]["text"], "label": rows[i]["label"]}
                                for i in weak["misclassified"][: loop.max_hard_examples] if i in rows]
    return out


def round_job(job: JobConfig, index: int, size: int, steer: dict[str, Any]) -> JobConfig:
    """Round ``index`` (1, 2, ...) as an ordinary job: ``stages.0`` asks for ``size`` examples
    (less the uncertain texts the teacher labels instead) with the round's steering, into
    ``<output_dir>/rounds/<index>``; no loop, and no students but the raw one a PVI filter
    needs (the loop trains the mixed students itself)."""
    pvi = job.quality.consistency.pvi_threshold is not None
    tree = json.loads(job.model_dump_json())
    tree.update({"loop": None, "output_dir": str(location(job.output_dir) / ROUNDS / str(index))})
    tree["data"]["unlabelled_path"] = None
    tree["stages"][0].update({
        "num_examples": size - len(steer.get("uncertain", [])), "round": index,
        "label_distribution": steer["label_distribution"],
        "steer": steer["steer"], "hard_examples": steer["hard_examples"]})
    tree["student"]["train_sets"] = ["raw"] if pvi else []
    return JobConfig.model_validate(tree)


def uncertain_job(job: JobConfig, index: int) -> JobConfig:
    """Round ``index``'s uncertainty sampling as an ordinary job: the teacher labels the texts
    of ``rounds/<index>/uncertain.jsonl`` (``loop.label_shots`` raw examples per label shown),
    with the job's quality passes, into ``rounds/<index>/uncertain``; no students."""
    folder = location(job.output_dir) / ROUNDS / str(index)
    tree = json.loads(job.model_dump_json())
    tree.update({"loop": None, "output_dir": str(folder / UNCERTAIN)})
    tree["data"]["unlabelled_path"] = str(folder / f"{UNCERTAIN}.jsonl")
    tree["stages"] = [{"type": "label", "mode": "annotate", "shots": job.loop.label_shots}]
    tree["student"]["train_sets"] = []
    tree["quality"]["consistency"]["pvi_threshold"] = None
    return JobConfig.model_validate(tree)


def uncertain_texts(job: JobConfig, students: dict[str, Any], pool, skip: set[str], count: int,
                    seed: int) -> list[dict[str, Any]]:
    """The ``count`` texts of the unlabelled pool the students are least sure of.

    A seeded sample of ``loop.pool_sample`` pool texts (those in ``skip``, texts labelled
    before and the raw texts, left out) is scored by every seed's student; the texts with the
    smallest margin between the top two labels of their mean probabilities come first.

    Args:
        job: The loop's job.
        students: The mixed students (``runs`` with each seed's ``checkpoint``).
        pool: ``data.unlabelled_path`` read in Ray Data (:class:`raydag.data.InputRows`).
        skip: Texts not to take.
        count: How many to return.
        seed: The sample's seed.

    Returns:
        Rows with ``id`` (the pool row's), ``text`` and ``margin``.
    """
    from ray.data.expressions import col

    from raydag.evaluate import margins
    from raydag.train import student_probs

    if count <= 0:
        return []
    rng = np.random.default_rng(seed)
    drawn = rng.choice(pool.count, size=min(pool.count, job.loop.pool_sample + len(skip)), replace=False)
    frame = (pool.dataset.filter(expr=col("_row").is_in(sorted(int(i) for i in drawn)))
             .select_columns(["id", "text"]).to_pandas())
    frame = frame[~frame["text"].isin(skip)].drop_duplicates("text").sort_values("id", kind="stable")
    frame = frame.head(job.loop.pool_sample).reset_index(drop=True)
    texts = frame["text"].astype(str).tolist()
    probs = np.mean([student_probs(texts, job.data.labels, run["checkpoint"])
                     for run in students["runs"].values()], axis=0)
    margin = margins(probs) if texts else np.zeros(0)
    order = np.argsort(margin, kind="stable")[:count]
    return [{"id": str(frame["id"][i]), "text": texts[i], "margin": round(float(margin[i]), 4)} for i in order]


def one_pass_job(job: JobConfig, examples: int, tokens: int) -> JobConfig:
    """The loop's baseline: the same job in one pass, asking for ``examples`` at once with at
    most ``tokens`` teacher tokens, its mixed student trained, into ``<output_dir>/one_pass``."""
    tree = json.loads(job.model_dump_json())
    tree.update({"loop": None, "output_dir": str(location(job.output_dir) / ONE_PASS)})
    tree["stages"][0]["num_examples"] = examples
    tree["data"]["unlabelled_path"] = None
    budget = job.budget.max_tokens
    tree["budget"]["max_tokens"] = min(budget, tokens) if budget else tokens
    pvi = job.quality.consistency.pvi_threshold is not None
    tree["student"]["train_sets"] = ["raw", "mixed"] if pvi else ["mixed"]
    return JobConfig.model_validate(tree)


def dev_weaknesses(students: dict[str, Any], labels: list[str], rows_by_key: dict[str, dict]) -> dict:
    """:func:`raydag.evaluate.weaknesses` over the dev rows of every seed of a student (a row
    held out by several seeds gets the mean of their probabilities)."""
    from raydag.evaluate import weaknesses
    from raydag.train import DEV_PREDICTIONS

    probs: dict[str, list] = {}
    gold: dict[str, int] = {}
    for run in students["runs"].values():
        found = json.loads((location(run["checkpoint"]) / DEV_PREDICTIONS).read_text())
        for key, label, p in zip(found["keys"], found["labels"], found["probs"]):
            probs.setdefault(key, []).append(p)
            gold[key] = label
    keys = [k for k in probs if k in rows_by_key]
    matrix = np.array([np.mean(probs[k], axis=0) for k in keys]).reshape(len(keys), len(labels))
    return weaknesses(labels, [gold[k] for k in keys], matrix, [rows_by_key[k]["id"] for k in keys])


def run_loop(job: JobConfig, cluster: dict[str, float]) -> RunPath:
    """Run the closed loop (see the module docstring) on ``cluster`` (Ray's resources) and
    return the path of its report. :func:`raydag.pipeline.run_job` calls it for a job with
    a ``loop`` section."""
    from datetime import datetime, timezone

    from raydag.data import read_inputs
    from raydag.outputs import claim_output_dir
    from raydag.pipeline import run_job
    from raydag.report import StageTimer
    from raydag.resources import plan_placement

    started = datetime.now(timezone.utc)
    out = location(job.output_dir)
    sizes = round_sizes(job)
    _, test, inputs, _ = read_inputs(job)
    dev = inputs.get("dev")
    pool = inputs.get("unlabelled") if "uncertainty" in job.loop.strategies else None
    student = plan_placement(job, cluster)["student"]
    timer, rounds, reports, steer, tokens = StageTimer(), [], [], steering(job, None, {}), 0
    raw = by_key = None  # the raw sample (the same in every round) and the dev rows by text digest
    labelled: set[str] = set()  # pool texts the teacher labelled in earlier rounds
    console.say(f"[loop] {job.loop.rounds} rounds of {', '.join(map(str, sizes))} examples; "
                f"steering: {', '.join(job.loop.strategies) or 'none'}")
    for index, size in enumerate(sizes, start=1):
        folder = out / ROUNDS / str(index)
        this = round_job(job, index, size, steer)
        console.say(f"[loop] round {index}/{len(sizes)}: {size} examples"
                    + (f", labels {this.stages[0].label_distribution}" if steer["steer"] else "")
                    + (f", {len(steer['hard_examples'])} hard examples" if steer["hard_examples"] else "")
                    + (f", {len(steer['uncertain'])} uncertain pool texts for the teacher to label"
                       if steer["uncertain"] else ""))
        report = _finished_round(folder, this)
        if report is None:
            claim_output_dir(str(folder))
            write_atomically(folder / "steer.json", json.dumps(steer, indent=1))
            report = json.loads(location(run_job(this)).read_text())
        parts = [report]
        if steer["uncertain"]:
            parts.append(_labelled_round(job, index, steer["uncertain"]))
            labelled.update(u["text"] for u in steer["uncertain"])
        reports.append(parts)
        tokens += sum(r["teacher"]["tokens_in"] + r["teacher"]["tokens_out"] for r in parts)
        if raw is None:
            raw = read_dataset(location(report["outputs"]["raw"])).to_pandas()
            by_key = _dev_rows(raw, dev)
        synthetic, across = _accepted_so_far(job, reports)
        students = _round_students(job, folder, reports, raw, synthetic, test, dev, student, timer)
        mixed = students["mixed"]
        weak = dev_weaknesses(mixed, job.data.labels, by_key)
        console.say(f"[loop] round {index}: mixed student accuracy {mixed['accuracy']:.4f}"
                    + (f" ± {mixed['accuracy_std']:.4f}" if len(mixed["seeds"]) > 1 else "")
                    + f" on {mixed['train_examples']} rows; dev F1 by class {weak['per_class_f1']}; "
                    f"teacher tokens so far {tokens:,}")
        rounds.append({
            "round": index, "asked": size, "steering": steer,
            "accepted": sum(r["counts"]["accepted"] for r in parts),
            "labelled_accepted": parts[1]["counts"]["accepted"] if len(parts) > 1 else 0,
            "cross_round_duplicates": across,
            "teacher_tokens": tokens, "report": str(folder / "report.json"),
            "student": {k: mixed[k] for k in _STUDENT_KEYS},
            "weaknesses": weak,
        })
        steer = steering(job, weak, {r["id"]: r for r in by_key.values()})
        if pool is not None and index < len(sizes):
            with timer(f"uncertainty_{index + 1}"):
                steer["uncertain"] = uncertain_texts(
                    job, mixed, pool, labelled | set(raw["text"].astype(str)),
                    round(sizes[index] * job.loop.uncertain_share), seed=job.seed + index)
    report = {"job": job.name, "started_at": started.isoformat(timespec="seconds"),
              "output_dir": str(job.output_dir), "loop": json.loads(job.loop.model_dump_json()),
              "rounds": rounds, "teacher_tokens": tokens}
    if job.loop.compare_one_pass:
        report.update(_one_pass(job, sum(sizes), tokens, rounds[-1]["student"]))
    report.update({"finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   "stages": timer.seconds, "config": json.loads(job.model_dump_json())})
    report = json.loads(display(json.dumps(report)))
    write_atomically(out / "report.md", loop_markdown(report))
    write_atomically(out / "report.json", json.dumps(report, indent=1))
    return out / "report.json"


def _dev_rows(raw: pd.DataFrame, dev: pd.DataFrame | None) -> dict[str, dict[str, str]]:
    """The rows a student may hold out as dev rows (the raw sample, and ``data.dev_path``'s),
    by the digest of their text, as the students' dev predictions name them."""
    rows = {stable_hash(str(t)): {"id": str(i), "text": str(t), "label": str(y)}
            for i, t, y in zip(raw["id"], raw["text"], raw["label"])}
    if dev is not None:
        rows.update({stable_hash(str(t)): {"id": f"dev:{stable_hash(str(t))}", "text": str(t),
                                           "label": str(y)} for t, y in zip(dev["text"], dev["label"])})
    return rows


def _one_pass(job: JobConfig, examples: int, tokens: int, loop_student: dict) -> dict:
    """Run the one-pass baseline (:func:`one_pass_job`) and compare its mixed student with the
    loop's last one."""
    from raydag.evaluate import compare
    from raydag.outputs import claim_output_dir
    from raydag.pipeline import run_job

    baseline = one_pass_job(job, examples, tokens)
    console.say(f"[loop] one-pass baseline: {examples} examples at once, at most {tokens:,} "
                "teacher tokens")
    claim_output_dir(baseline.output_dir)
    report = json.loads(location(run_job(baseline)).read_text())
    mixed = report["students"]["mixed"]
    verdict = compare(loop_student, mixed, "loop", "one_pass")
    console.say(f"[loop] loop {loop_student['accuracy']:.4f} against one pass {mixed['accuracy']:.4f}: "
                f"{verdict['verdict']}")
    return {"one_pass": {
        "asked": examples, "accepted": report["counts"]["accepted"],
        "teacher_tokens": report["teacher"]["tokens_in"] + report["teacher"]["tokens_out"],
        "report": str(location(baseline.output_dir) / "report.json"),
        "student": {k: mixed[k] for k in _STUDENT_KEYS}}, "comparison": verdict}


def _finished_round(folder: RunPath, job: JobConfig) -> dict | None:
    """The round's report when it finished with this plan (the same ``stages.0`` and
    unlabelled texts), else None."""
    from raydag.config import ran_as

    path = folder / "report.json"
    if not path.exists():
        return None
    report = json.loads(path.read_text())
    config = report.get("config") or {}
    then = json.loads(job.model_dump_json())  # the job, with what it ran in these two settings
    then["stages"][0] = (config.get("stages") or [None])[0]
    then["data"]["unlabelled_path"] = (config.get("data") or {}).get("unlabelled_path")
    return report if ran_as(then, job) else None


def _labelled_round(job: JobConfig, index: int, uncertain: list[dict[str, Any]]) -> dict:
    """Have the teacher label round ``index``'s uncertain pool texts (:func:`uncertain_job`),
    or reuse the labelling a run before finished with the same texts; its report."""
    from raydag.outputs import claim_output_dir
    from raydag.pipeline import run_job

    labelling = uncertain_job(job, index)
    texts = location(labelling.data.unlabelled_path)
    content = "".join(json.dumps({"text": u["text"]}, ensure_ascii=False) + "\n" for u in uncertain)
    if texts.exists() and texts.read_text(encoding="utf-8") == content:
        report = _finished_round(location(labelling.output_dir), labelling)
        if report is not None:
            return report
    write_atomically(texts, content)
    claim_output_dir(labelling.output_dir)
    console.say(f"[loop] round {index}: the teacher labels the {len(uncertain)} pool texts the "
                f"students are least sure of (margins {uncertain[0]['margin']}-{uncertain[-1]['margin']})")
    return json.loads(location(run_job(labelling)).read_text())


def _accepted_so_far(job: JobConfig, reports: list[list[dict]]):
    """The accepted rows of the rounds so far (each round's reports, in order: its created
    rows, then the pool texts the teacher labelled; ``text``, ``label``) as a Ray Dataset,
    exact and near duplicates across rounds dropped (the earlier round's copy kept), and how
    many rows of the last round that dropped."""
    from ray.data.expressions import col

    from raydag.stages import deduplicate

    parts = [read_dataset(location(report["outputs"]["synthetic"]), columns=["id", "text", "label", "_order"])
             .map_batches(_in_round, fn_kwargs={"index": index, "part": part}, batch_format="pandas")
             for index, round_reports in enumerate(reports, start=1)
             for part, report in enumerate(round_reports) if report["outputs"].get("synthetic")]
    if not parts:
        return None, 0
    rows = deduplicate(parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0])
    near = job.quality.near_dup
    if near.enabled:
        from raydag.filters.near_dup import mark_near_duplicates

        rows, _ = mark_near_duplicates(rows, threshold=near.threshold, num_perm=near.num_perm,
                                       shingle_size=near.shingle_size, seed=job.seed)
    rows = rows.materialize()
    dropped = rows.filter(expr=(col("_status") != "accepted") & (col("_round") == len(reports))).count()
    kept = rows.filter(expr=col("_status") == "accepted").select_columns(["text", "label"])
    return kept.materialize(), int(dropped)


def _in_round(batch: pd.DataFrame, index: int, part: int = 0) -> pd.DataFrame:
    batch = batch.copy()
    batch["_order"] = batch["_order"].astype("int64") + (2 * index + part) * _ROUND_ORDER
    batch["_round"] = index
    batch["_status"], batch["_reason"], batch["_stage"] = "accepted", "", ""
    return batch


def _round_students(job, folder, reports, raw, synthetic, test, dev, student, timer) -> dict:
    """The mixed students after the rounds of ``reports`` (every seed), reused from
    ``<folder>/students.json`` when they trained on the same rounds."""
    from raydag.pipeline import run_students

    # A round of one job keys by its signature alone, as before rounds could also label.
    key = {"rounds": [[report["signature"] for report in parts] if len(parts) > 1 else parts[0]["signature"]
                      for parts in reports],
           "student": json.loads(job.student.model_dump_json())}
    path = folder / "students.json"
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            return saved["students"]
    students = run_students(job, raw, synthetic, test, dev, folder, student, timer, only=["mixed"])
    write_atomically(path, json.dumps({"key": key, "students": students}, indent=1))
    return students


def loop_markdown(report: dict[str, Any]) -> str:
    """The loop's report as Markdown: one row per round."""
    lines = [f"# Closed loop: {report['job']}", "",
             "| round | asked | accepted | cross-round duplicates | teacher tokens so far | "
             "mixed student accuracy | dev F1 by class | steered |",
             "|---:|---:|---:|---:|---:|---|---|---|"]
    for r in report["rounds"]:
        s = r["student"]
        spread = f" ± {s['accuracy_std']:.4f}" if len(s["seeds"]) > 1 else ""
        steered = ", ".join(f"{y}: {why}" for y, why in r["steering"]["steer"].items())
        hard, unsure = len(r["steering"]["hard_examples"]), len(r["steering"].get("uncertain", []))
        steered += (f"; {hard} hard examples" if hard else "")
        steered += (f"; {unsure} uncertain pool texts labelled ({r['labelled_accepted']} accepted)"
                    if unsure else "")
        f1 = ", ".join(f"{y} {v:.2f}" for y, v in r["weaknesses"]["per_class_f1"].items())
        lines.append(f"| {r['round']} | {r['asked']} | {r['accepted']} | {r['cross_round_duplicates']} "
                     f"| {r['teacher_tokens']:,} | {s['accuracy']:.4f}{spread} | {f1} | {steered or '-'} |")
    if "one_pass" in report:
        one, verdict = report["one_pass"], report["comparison"]
        s = one["student"]
        spread = f" ± {s['accuracy_std']:.4f}" if len(s["seeds"]) > 1 else ""
        lines += ["", f"One pass ({one['asked']} examples at once, {one['teacher_tokens']:,} teacher "
                  f"tokens, {one['accepted']} accepted): mixed student accuracy "
                  f"{s['accuracy']:.4f}{spread}. Loop - one pass: {verdict['difference']:+.4f} "
                  f"(spread {verdict['spread']:.4f}): **{verdict['verdict']}**."]
    return "\n".join(lines) + "\n"
