"""The student recipe: one train loop for Ray Train's ``TorchTrainer`` with DeepSpeed.

Each worker fine-tunes a sequence classifier (a new head on the student encoder) on its share of
the rows, then scores its share of the test split; the confusion matrices are summed across
workers and rank 0 saves the model and reports metrics with it as a checkpoint.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from raydag.config import StudentConfig
from raydag.errors import RaydagError


def deepspeed_config(student: StudentConfig, world_size: int) -> dict[str, Any]:
    """DeepSpeed settings from the typed student config."""
    return {
        "train_micro_batch_size_per_gpu": student.batch_size,
        "train_batch_size": student.batch_size * world_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": student.zero_stage},
        "bf16": {"enabled": student.precision == "bf16"},  # resolved from auto by the caller
        "fp16": {"enabled": student.precision == "fp16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def worker_batches(lengths: list[int], rank: int, world: int, batch_size: int,
                   rng: np.random.Generator) -> list[list[int]]:
    """This worker's batches of row indices for one epoch.

    Rows are shuffled and cut into equal shares (wrapping around, so no row is skipped and every
    worker runs the same number of steps: DeepSpeed's collectives need them in lock-step).
    Within windows of 16 batches, rows are sorted by length so batches pad little; the batch
    order is then shuffled.
    """
    n = len(lengths)
    per_worker = -(-n // world)
    mine = np.resize(rng.permutation(n), per_worker * world)[rank::world].tolist()
    window = batch_size * 16
    batches = []
    for start in range(0, len(mine), window):
        chunk = sorted(mine[start : start + window], key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    order = rng.permutation(len(batches))
    return [batches[i] for i in order]


def train_loop(config: dict) -> None:
    """Runs on every Ray Train worker: trains and scores each student of ``config["students"]``
    in turn, in one worker group (one process group, one DeepSpeed start-up for them all)."""
    import deepspeed
    import ray
    import ray.train
    import torch
    from transformers import AutoTokenizer

    student = StudentConfig.model_validate(config["student"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()

    deepspeed.init_distributed()  # reuses the process group Ray Train made
    # Resolved on the worker: an embedded model lives in this node's own installation.
    from raydag.models import resolve_model

    model_path = resolve_model(student.model)
    local = os.path.isdir(model_path)  # else a Hugging Face id, fetched from the hub
    tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=local)
    worker = _Worker(config=config, student=student, tokenizer=tokenizer, model_path=model_path,
                     local=local, rank=rank, world=world, test=ray.get(config["test_rows"]))
    for entry in config["students"]:
        _train_one(entry["name"], *ray.get(entry["train_rows"]), worker)
        torch.distributed.barrier()


@dataclass
class _Worker:
    """What every student of one Ray Train worker shares."""

    config: dict
    student: StudentConfig
    tokenizer: Any
    model_path: str
    local: bool
    rank: int
    world: int
    test: tuple[list[str], list[str]]  # texts, labels


def _train_one(name: str, texts: list[str], train_labels: list[str], worker: _Worker) -> None:
    """Fine-tune and score one student, and report its metrics (rank 0: with the saved
    student as the checkpoint)."""
    import deepspeed
    import ray.train
    import torch
    from transformers import AutoModelForSequenceClassification

    from raydag.evaluate import accuracy, confusion_matrix, macro_f1

    config, student, tokenizer = worker.config, worker.student, worker.tokenizer
    model_path, local, rank, world = worker.model_path, worker.local, worker.rank, worker.world
    test_texts, test_labels = worker.test
    labels: list[str] = config["labels"]
    label2id = {label: i for i, label in enumerate(labels)}
    torch.manual_seed(config["seed"])
    model = AutoModelForSequenceClassification.from_pretrained(
        model_path,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id=label2id,
        local_files_only=local,
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=student.learning_rate)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(student, world)
    )
    device = engine.device

    def encode(batch_texts: list[str]) -> dict:
        enc = tokenizer(batch_texts, padding=True, truncation=True, max_length=student.max_length,
                        return_tensors="pt")
        return {k: v.to(device) for k, v in enc.items()}

    lengths = [len(t) for t in texts]
    rng = np.random.default_rng(config["seed"])  # same seed on every worker: one shared permutation
    started = time.time()
    for epoch in range(student.epochs):
        engine.train()
        losses = []
        for idx in worker_batches(lengths, rank, world, student.batch_size, rng):
            batch = encode([texts[i] for i in idx])
            target = torch.tensor([label2id[train_labels[i]] for i in idx], device=device)
            loss = engine(**batch, labels=target).loss
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        if rank == 0:
            print(f"[student {name}] epoch {epoch + 1}/{student.epochs} "
                  f"loss={np.mean(losses):.4f} ({time.time() - started:.0f}s)", flush=True)
    train_seconds = time.time() - started

    engine.eval()
    mine = list(range(rank, len(test_texts), world))
    y_true, y_pred = [], []
    with torch.no_grad():
        for start in range(0, len(mine), 64):
            idx = mine[start : start + 64]
            logits = engine(**encode([test_texts[i] for i in idx])).logits
            y_pred.extend(logits.argmax(dim=-1).tolist())
            y_true.extend(label2id[test_labels[i]] for i in idx)
    matrix = torch.tensor(confusion_matrix(y_true, y_pred, len(labels)), device=device)
    if world > 1:
        torch.distributed.all_reduce(matrix)  # NCCL needs the tensor on the GPU
    matrix = matrix.cpu().numpy()
    metrics = {
        "accuracy": accuracy(matrix),
        "macro_f1": macro_f1(matrix),
        "train_examples": len(texts),
        "test_examples": int(matrix.sum()),
        "train_seconds": round(train_seconds, 2),
        "precision": student.precision,
        "confusion_matrix": matrix.tolist(),
    }
    if rank == 0:
        with tempfile.TemporaryDirectory() as folder:
            engine.module.save_pretrained(folder, safe_serialization=True)
            tokenizer.save_pretrained(folder)
            Path(folder, "metrics.json").write_text(json.dumps(metrics, indent=1))
            ray.train.report({**metrics, "student": name},
                             checkpoint=ray.train.Checkpoint.from_directory(folder))
    else:
        ray.train.report({**metrics, "student": name})
    engine.destroy()


def fit_students(
    train_sets: dict[str, tuple[list[str], list[str]]],
    test_texts: list[str],
    test_labels: list[str],
    *,
    label_set: list[str],
    student: StudentConfig,
    storage_dir: str,
    seed: int,
    run_name: str = "students",
) -> dict[str, dict[str, Any]]:
    """Fine-tune one student per training set with Ray Train + DeepSpeed, in one run (one
    worker group, started once), and evaluate each on the test split.

    ``student.num_workers``, ``student.use_gpu`` and ``student.precision`` are taken as given
    (see :func:`raydag.resources.student_workers` and :func:`raydag.resources.student_precision`
    for how a job's ``null`` / ``auto`` are decided).

    Args:
        train_sets: Training texts and labels by student name (``raw``, ``synthetic``...).
        test_texts: Test split texts.
        test_labels: Test split labels.
        label_set: The job's labels.
        student: The recipe's settings.
        storage_dir: Where Ray Train keeps the run and each student's checkpoint.
        seed: Seed of initialisation and batch order.
        run_name: Ray Train run name (a folder of ``storage_dir``).

    Returns:
        Per student: metrics (``accuracy``, ``macro_f1``, ``train_examples``...) and
        ``checkpoint``, the folder of the saved student.

    Raises:
        RaydagError: When a set has nothing to train on or training fails.
    """
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    for name, (texts, _) in train_sets.items():
        if not texts:
            raise RaydagError(f"student '{name}': no training rows")
    config = {
        "student": student.model_dump(),
        "labels": label_set,
        "seed": seed,
        "students": [{"name": name, "train_rows": ray.put((list(texts), list(labels)))}
                     for name, (texts, labels) in train_sets.items()],
        "test_rows": ray.put((list(test_texts), list(test_labels))),
    }
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=student.num_workers,
                                     use_gpu=bool(student.use_gpu)),
        run_config=RunConfig(name=run_name, storage_path=os.path.abspath(storage_dir)),
    )
    names = ", ".join(train_sets)
    try:
        result = trainer.fit()  # Ray Train raises the training error itself
    except Exception as err:
        raise RaydagError(f"student(s) {names} failed to train: {err}") from err
    out: dict[str, dict[str, Any]] = {}
    for checkpoint, metrics in result.best_checkpoints or []:
        name = metrics.get("student")
        if name in train_sets:
            out[name] = {k: v for k, v in metrics.items() if not k.startswith("_") and k != "student"}
            out[name]["checkpoint"] = checkpoint.path
    missing = [name for name in train_sets if name not in out]
    if missing:
        raise RaydagError(f"student(s) {missing} reported no checkpoint")
    return {name: out[name] for name in train_sets}


def fit_student(name: str, texts: list[str], labels: list[str], test_texts: list[str],
                test_labels: list[str], **kwargs: Any) -> dict[str, Any]:
    """One student (see :func:`fit_students`)."""
    return fit_students({name: (texts, labels)}, test_texts, test_labels, run_name=name,
                        **kwargs)[name]


class StudentScorer:
    """Ray Data actor: ``log2_p_label``, the log2 probability a trained student gives each row's
    ``label`` for its ``text``.

    Args:
        checkpoint: Folder of a student saved by :func:`train_loop`.
        max_length: Tokens per text after truncation.
    """

    def __init__(self, checkpoint: str, max_length: int = 128) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        self._tokenizer = AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)
        self._model = AutoModelForSequenceClassification.from_pretrained(
            checkpoint, local_files_only=True).float().eval()
        self._label2id = dict(self._model.config.label2id)
        self._max_length = max_length

    def __call__(self, batch):
        import torch

        enc = self._tokenizer([str(t) for t in batch["text"]], padding=True, truncation=True,
                              max_length=self._max_length, return_tensors="pt")
        with torch.no_grad():
            logp = torch.log_softmax(self._model(**enc).logits, dim=-1)
        index = torch.tensor([self._label2id[str(label)] for label in batch["label"]])
        out = batch.copy()
        out["log2_p_label"] = (logp[torch.arange(len(index)), index] / np.log(2)).numpy()
        return out


def student_log2_probs(texts: list[str], labels: list[str], checkpoint: str, *,
                       threads: int | None = None) -> np.ndarray:
    """log2 p(label | text) under a trained student, scored in one Ray Data actor."""
    import pandas as pd

    from raydag.stages import map_in_one_actor

    if not texts:
        return np.zeros(0)
    out = map_in_one_actor(pd.DataFrame({"text": texts, "label": labels}), StudentScorer,
                           {"checkpoint": checkpoint}, threads=threads)
    return out["log2_p_label"].to_numpy(dtype=float)


def pointwise_v_information(log2_p_label: np.ndarray, labels: list[str],
                            prior: dict[str, float]) -> np.ndarray:
    """PVI in bits (Ethayarajh et al., 2022): ``log2 p(y|x) - log2 p(y)``, with the null
    model's p(y) taken as the label shares of the student's training rows.

    Example:
        >>> pointwise_v_information(np.log2(np.array([0.9, 0.2])), ["a", "b"], {"a": 0.5, "b": 0.5}).round(3)
        array([ 0.848, -1.322])
    """
    return np.asarray(log2_p_label, dtype=float) - np.log2([prior[str(y)] for y in labels])
