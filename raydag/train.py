"""The student recipe: one train loop for Ray Train's ``TorchTrainer`` with DeepSpeed.

A student is the encoder, pooled the way it was trained (mean pooling and L2 normalisation for
a sentence encoder, read from its ``modules.json``), with a linear head. Per student, every
worker:

1. embeds its share of the training and dev rows with the frozen encoder (the vectors are
   gathered) and fits the **linear probe** baseline, a logistic regression whose L2 weight is chosen on
   the dev split; the student's head starts from it (linear probing, then fine-tuning);
2. fine-tunes encoder and head with AdamW under a warmup-then-decay schedule, for at least
   ``min_steps`` optimizer steps (small sets get more epochs), on random batches;
3. scores the dev split before training and after every epoch and keeps the best state
   (dev accuracy, then dev loss), stopping after ``patience`` epochs without a better one:
   the epoch is chosen on dev, never on test;
4. scores the test split (each worker its share; confusion matrices are summed).

Rank 0 reports the metrics (student, probe, majority class) with a checkpoint folder; the
student's weights are saved for the first seed of each train set.

Rows reach the workers through Ray Train's dataset ingest: the driver tokenises every
student's training and dev rows and the test split in Ray Data (:func:`tokenised`), cuts each
into one balanced share per worker (:func:`worker_shares`), and passes the shares as the
trainer's ``datasets``; each worker reads only its own shares with ``get_dataset_shard``. No
text is tokenised on a training thread, and no worker holds another worker's rows.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raydag.config import StudentConfig
from raydag.embed import model_device, pool_states
from raydag.data import preserving_order
from raydag.errors import RaydagError
from raydag.storage import arrow, is_uri, location

PROBE_L2 = (1e-4, 1e-3, 1e-2, 1e-1)  # L2 weights the probe tries (chosen on dev)


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


def pooling_of(model_path: str, setting: str = "auto") -> tuple[str, bool]:
    """How to pool the encoder's token states, and whether to L2-normalise the result.

    ``auto`` reads a sentence-transformers model's own ``modules.json`` and pooling config
    (``mean``, ``cls`` or ``max``; a ``Normalize`` module means normalise); a model without
    them is mean-pooled. An explicit ``setting`` wins for the mode.
    """
    mode, normalise = "mean", False
    modules = _model_file(model_path, "modules.json")
    if modules is not None:
        entries = json.loads(modules.read_text())
        normalise = any(m.get("type", "").endswith("Normalize") for m in entries)
        pooling = next((m for m in entries if m.get("type", "").endswith("Pooling")), None)
        config = _model_file(model_path, f"{pooling['path']}/config.json") if pooling else None
        if config is not None:
            flags = json.loads(config.read_text())
            for name in ("cls_token", "max_tokens", "mean_tokens"):
                if flags.get(f"pooling_mode_{name}"):
                    mode = name.split("_")[0]
    return (mode if setting == "auto" else setting), normalise


def _model_file(model_path: str, name: str) -> Path | None:
    """A file of a local model folder, or of a hub model already in the local cache."""
    if os.path.isdir(model_path):
        path = Path(model_path, name)
        return path if path.is_file() else None
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(model_path, name, local_files_only=bool(os.environ.get(
            "HF_HUB_OFFLINE"))))
    except Exception:  # no such file in the repo, or offline without it: mean pooling
        return None


class StudentClassifier(torch.nn.Module):
    """Encoder, pooling (and L2 normalisation for sentence encoders), dropout, linear head."""

    def __init__(self, encoder: torch.nn.Module, num_labels: int, pooling: str, normalise: bool,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.encoder, self.pooling, self.normalise = encoder, pooling, normalise
        self.dropout = torch.nn.Dropout(dropout)
        self.head = torch.nn.Linear(encoder.config.hidden_size, num_labels)

    def embed(self, input_ids, attention_mask, **rest) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **rest).last_hidden_state
        pooled = pool_states(hidden, attention_mask, self.pooling)
        return torch.nn.functional.normalize(pooled, dim=-1) if self.normalise else pooled

    def forward(self, input_ids, attention_mask, **rest) -> torch.Tensor:
        return self.head(self.dropout(self.embed(input_ids, attention_mask, **rest)))


def schedule_plan(rows: int, world: int, student: StudentConfig) -> dict[str, int]:
    """Epochs, steps per epoch, total and warmup steps: at least ``student.epochs`` passes and
    at least ``student.min_steps`` optimizer steps (so 100 rows still get enough updates).

    Example:
        >>> from raydag.config import StudentConfig
        >>> schedule_plan(80, 2, StudentConfig(batch_size=16, epochs=3, min_steps=100))
        {'epochs': 34, 'steps_per_epoch': 3, 'total_steps': 102, 'warmup_steps': 10}
    """
    per_worker = -(-rows // world)
    steps_per_epoch = max(1, -(-per_worker // student.batch_size))
    epochs = max(student.epochs, -(-student.min_steps // steps_per_epoch))
    total = epochs * steps_per_epoch
    return {"epochs": epochs, "steps_per_epoch": steps_per_epoch, "total_steps": total,
            "warmup_steps": int(round(student.warmup_ratio * total))}


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Learning-rate multiplier at ``step``: linear warmup to 1 over ``warmup`` steps, then
    ``linear`` or ``cosine`` decay to 0 at ``total`` (``constant``: 1 after warmup).

    Example:
        >>> [round(lr_factor(s, 10, 2, "linear"), 3) for s in (0, 1, 2, 6, 10)]
        [0.333, 0.667, 1.0, 0.5, 0.0]
    """
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress


def share_batches(share: int, per_worker: int, batch_size: int,
                  rng: np.random.Generator) -> list[list[int]]:
    """One epoch of random batches over this worker's ``share`` rows (indices into the share).

    Every worker runs ``per_worker`` rows an epoch (``ceil(rows / world)``; a worker whose share
    is a row short wraps around), so all run the same number of steps: DeepSpeed's
    collectives need them in lock-step. The batches are random, never sorted by length or
    label: on synthetic data a length shortcut would make sorted batches nearly single-label.

    Example:
        >>> share_batches(5, 6, 4, np.random.default_rng(0))
        [[2, 4, 3, 0], [1, 2]]
    """
    order = np.resize(rng.permutation(share), per_worker).tolist()
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def fit_probe(x_train: torch.Tensor, y_train: torch.Tensor, x_dev: torch.Tensor,
              y_dev: torch.Tensor, num_labels: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The linear probe: a multinomial logistic regression on frozen embeddings (full-batch
    L-BFGS), its L2 weight chosen from :data:`PROBE_L2` on the dev rows (accuracy, then loss;
    without dev rows the middle of the grid).

    Returns:
        Weight ``(num_labels, dim)``, bias ``(num_labels,)``, and the L2 weight chosen.
    """
    best: tuple | None = None
    grid = PROBE_L2 if len(y_dev) else PROBE_L2[len(PROBE_L2) // 2 : len(PROBE_L2) // 2 + 1]
    for l2 in grid:
        weight = torch.zeros(num_labels, x_train.shape[1], requires_grad=True)
        bias = torch.zeros(num_labels, requires_grad=True)
        optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=200,
                                      line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(x_train @ weight.T + bias, y_train) \
                + l2 * weight.pow(2).sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        with torch.no_grad():
            if len(y_dev):
                logits = x_dev @ weight.T + bias
                key = ((logits.argmax(-1) == y_dev).float().mean().item(),
                       -torch.nn.functional.cross_entropy(logits, y_dev).item())
            else:
                key = (0.0, 0.0)
        if best is None or key > best[0]:
            best = (key, weight.detach().clone(), bias.detach().clone(), l2)
    return best[1], best[2], best[3]


def train_loop(config: dict) -> None:
    """Runs on every Ray Train worker: trains and scores each student of ``config["students"]``
    in turn, in one worker group (one process group, one DeepSpeed start-up for them all),
    each on this worker's shares of its rows (see :func:`worker_shares`)."""
    import deepspeed
    import ray.train
    from transformers import AutoModel, AutoTokenizer

    student = StudentConfig.model_validate(config["student"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()

    deepspeed.init_distributed()  # reuses the process group Ray Train made
    # Resolved on the worker: an embedded model lives in this node's own installation.
    from raydag.models import resolve_model

    model_path = resolve_model(student.model)
    local = os.path.isdir(model_path)  # else a Hugging Face id, fetched from the hub
    tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=local)
    labels: list[str] = config["labels"]
    frozen = StudentClassifier(AutoModel.from_pretrained(model_path, local_files_only=local),
                               len(labels), *pooling_of(model_path, student.pooling)).eval()
    worker = _Worker(student=student, labels=labels, tokenizer=tokenizer, rank=rank, world=world,
                     frozen=frozen, embeddings={})
    worker.test = worker.read_share(shard_name("test", 0, rank))
    worker.test_embeddings = worker.embed_local(worker.test.ids)
    for entry in config["students"]:
        _train_one(entry, worker.read_share(shard_name("train", entry["train_part"], rank)),
                   worker.read_share(shard_name("dev", entry["dev_part"], rank)), worker)
        torch.distributed.barrier()


def shard_name(kind: str, part: int, rank: int) -> str:
    """Name of one worker's share in the trainer's ``datasets``: ``kind`` (train, dev, test),
    the student (train) or seed (dev) it belongs to, and the worker's rank."""
    return f"{kind}_{part}_w{rank}"


@dataclass
class _Share:
    """A worker's share of one split, as the data pipeline tokenised it."""

    keys: list[str]  # a digest of each row's text: embeddings are cached by it
    ids: list[np.ndarray]  # token ids, truncated, not padded
    labels: list[int]  # label ids

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class _Worker:
    """What every student of one Ray Train worker shares."""

    student: StudentConfig
    labels: list[str]
    tokenizer: Any
    rank: int
    world: int
    frozen: StudentClassifier  # the untrained encoder: the probe's features, each student's start
    embeddings: dict[str, np.ndarray]  # frozen embeddings by row key, shared by the students
    test: _Share | None = None  # this worker's share of the test split
    test_embeddings: torch.Tensor | None = None

    def read_share(self, name: str) -> _Share:
        """Stream this worker's dataset ``name`` (Ray Train's ``get_dataset_shard``)."""
        import ray.train

        label2id = {label: i for i, label in enumerate(self.labels)}
        share = _Share([], [], [])
        for batch in ray.train.get_dataset_shard(name).iter_batches(batch_format="pandas",
                                                                     batch_size=4096):
            share.keys += batch["key"].tolist()
            share.ids += [np.asarray(ids) for ids in batch["input_ids"]]
            share.labels += [label2id[y] for y in batch["label"]]
        return share

    def encode(self, ids: list[np.ndarray], device: Any = "cpu") -> dict:
        """Pad a batch of token ids (the data pipeline tokenised them) to its longest row."""
        enc = self.tokenizer.pad({"input_ids": [row.tolist() for row in ids]},
                                 return_tensors="pt")
        return {k: v.to(device) for k, v in enc.items()
                if k in ("input_ids", "attention_mask")}

    def embed_local(self, ids: list[np.ndarray]) -> torch.Tensor:
        """Frozen embeddings of these rows, computed here (64 at a time, by length)."""
        if not ids:
            return torch.zeros(0, self.frozen.head.in_features)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out = torch.empty(len(ids), self.frozen.head.in_features)
        with torch.no_grad():
            for start in range(0, len(order), 64):
                idx = order[start : start + 64]
                out[idx] = self.frozen.embed(**self.encode([ids[i] for i in idx])).float()
        return out

    def embed_share(self, share: _Share) -> torch.Tensor:
        """Frozen embeddings of this worker's share (cached by row key for later students)."""
        todo = {k: i for i, k in enumerate(share.keys) if k not in self.embeddings}
        vectors = self.embed_local([share.ids[i] for i in todo.values()]).numpy()
        self.embeddings.update(zip(todo, vectors))
        if not len(share):
            return torch.zeros(0, self.frozen.head.in_features)
        return torch.from_numpy(np.stack([self.embeddings[k] for k in share.keys]))

    def gather(self, share: _Share) -> tuple[torch.Tensor, torch.Tensor]:
        """Every worker's frozen embeddings and label ids of one split (for the probe)."""
        mine = (self.embed_share(share).numpy(), share.labels)
        shares = [None] * self.world
        torch.distributed.all_gather_object(shares, mine)
        return (torch.from_numpy(np.concatenate([v for v, _ in shares])).float(),
                torch.tensor([y for _, ys in shares for y in ys], dtype=torch.long))


def _sum_over_workers(array: np.ndarray, world: int) -> np.ndarray:
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float64))
    if world > 1:
        tensor = tensor.to(_device())
        torch.distributed.all_reduce(tensor)  # NCCL needs the tensor on the GPU
    return tensor.cpu().numpy()


def _device() -> Any:
    import ray.train.torch

    return ray.train.torch.get_device()


def _scores(engine, worker: _Worker, share: _Share,
            num_labels: int) -> tuple[np.ndarray, float, list[list[float]]]:
    """Confusion matrix and mean loss of the model on every worker's share, summed, and the
    label probabilities of this worker's rows."""
    from raydag.evaluate import confusion_matrix

    y_pred, loss, probs = [], 0.0, []
    with torch.no_grad():
        for start in range(0, len(share), 64):
            logits = engine(**worker.encode(share.ids[start : start + 64], engine.device)).float()
            target = torch.tensor(share.labels[start : start + 64], device=logits.device)
            loss += torch.nn.functional.cross_entropy(logits, target, reduction="sum").item()
            y_pred.extend(logits.argmax(dim=-1).tolist())
            probs += torch.softmax(logits, dim=-1).cpu().numpy().round(5).tolist()
    matrix = confusion_matrix(share.labels, y_pred, num_labels).astype(np.float64)
    summed = _sum_over_workers(np.append(matrix.ravel(), loss), worker.world)
    matrix = summed[:-1].reshape(num_labels, num_labels).round().astype(np.int64)
    return matrix, float(summed[-1] / max(1, matrix.sum())), probs


# In each student's checkpoint folder: the chosen state's label probabilities on the dev rows
# (``keys``: digests of their texts, ``labels``: gold label ids, ``probs``), which the closed
# loop reads to find where the student is weak (raydag.evaluate.weaknesses).
DEV_PREDICTIONS = "dev_predictions.json"


def _dev_predictions(worker: _Worker, share: _Share, probs: list[list[float]]) -> dict[str, list]:
    """Every worker's dev rows with the probabilities :func:`_scores` gave them, in rank
    order (the same on every rank)."""
    mine = {"keys": list(share.keys), "labels": list(share.labels), "probs": probs}
    if worker.world == 1:
        return mine
    shares = [None] * worker.world
    torch.distributed.all_gather_object(shares, mine)
    return {key: [v for part in shares for v in part[key]] for key in mine}


def _train_one(entry: dict, train: _Share, dev: _Share, worker: _Worker) -> None:
    """Fit the probe, fine-tune and select on dev, score on test, and report (rank 0: with a
    checkpoint folder; the model in it when ``entry["save_model"]``)."""
    import deepspeed
    import ray.train

    from raydag.evaluate import confusion_matrix

    student, rank, world, labels = worker.student, worker.rank, worker.world, worker.labels
    rows, dev_rows = entry["train_rows"], entry["dev_rows"]
    seed = entry["seed"]
    torch.manual_seed(seed)
    started = time.time()

    # 1. The linear probe on frozen embeddings (fitted on rank 0, sent to every worker).
    (x_train, y_train), (x_dev, y_dev) = worker.gather(train), worker.gather(dev)
    weight = torch.zeros(len(labels), worker.frozen.head.in_features)
    bias, l2 = torch.zeros(len(labels)), torch.zeros(1)
    if rank == 0:
        weight, bias, chosen = fit_probe(x_train, y_train, x_dev, y_dev, len(labels))
        l2 = torch.tensor([chosen])
    if world > 1:
        for tensor in (weight, bias, l2):
            moved = tensor.to(_device())
            torch.distributed.broadcast(moved, src=0)
            tensor.copy_(moved.cpu())
    probe_pred = (worker.test_embeddings @ weight.T + bias).argmax(-1).tolist()
    probe_matrix = _sum_over_workers(confusion_matrix(worker.test.labels, probe_pred, len(labels)),
                                     world).round().astype(np.int64)
    label_counts = np.bincount(y_train.numpy(), minlength=len(labels))
    shares = [None] * world
    torch.distributed.all_gather_object(shares, len(train))
    probe_seconds = time.time() - started

    # 2. Fine-tuning of a copy of the frozen encoder (read from disk once per worker), from
    # the probe's head.
    frozen = worker.frozen
    model = StudentClassifier(copy.deepcopy(frozen.encoder), len(labels), frozen.pooling,
                              frozen.normalise, student.dropout)
    if student.head_init == "probe":
        with torch.no_grad():
            model.head.weight.copy_(weight)
            model.head.bias.copy_(bias)
    plan = schedule_plan(rows, world, student)
    decay = [p for n, p in model.named_parameters() if not n.endswith("bias") and "LayerNorm" not in n]
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias") or "LayerNorm" in n]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": student.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=student.learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(
        step, plan["total_steps"], plan["warmup_steps"], student.schedule))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           lr_scheduler=scheduler,
                                           config=deepspeed_config(student, world))

    def dev_key() -> tuple[tuple[float, float], float | None, float | None, list]:
        if not dev_rows:  # nothing to choose with: the last epoch is kept
            return (float(len(history)), 0.0), None, None, []
        engine.eval()
        matrix, loss, probs = _scores(engine, worker, dev, len(labels))
        acc = float(np.trace(matrix) / max(1, matrix.sum()))
        return (acc, -loss), acc, loss, probs

    history: list[dict] = []
    best_key, dev_acc, dev_loss, dev_probs = dev_key()
    best = {"epoch": 0, "dev_accuracy": dev_acc, "dev_loss": dev_loss, "dev_probs": dev_probs,
            "state": {k: v.detach().clone() for k, v in engine.module.state_dict().items()}}
    rng = np.random.default_rng([seed, rank])  # each worker shuffles its own share
    per_worker = -(-rows // world)
    for epoch in range(1, plan["epochs"] + 1):
        engine.train()
        losses = []
        for idx in share_batches(len(train), per_worker, student.batch_size, rng):
            batch = worker.encode([train.ids[i] for i in idx], engine.device)
            target = torch.tensor([train.labels[i] for i in idx], device=engine.device)
            loss = torch.nn.functional.cross_entropy(engine(**batch).float(), target)
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        key, dev_acc, dev_loss, dev_probs = dev_key()
        history.append({"epoch": epoch, "train_loss": round(float(np.mean(losses)), 4),
                        "dev_accuracy": _rounded(dev_acc), "dev_loss": _rounded(dev_loss)})
        if key > best_key:
            best_key = key
            best = {"epoch": epoch, "dev_accuracy": dev_acc, "dev_loss": dev_loss,
                    "dev_probs": dev_probs,
                    "state": {k: v.detach().clone() for k, v in engine.module.state_dict().items()}}
        if rank == 0:
            print(f"[student {entry['name']} seed {seed}] epoch {epoch}/{plan['epochs']} "
                  f"loss={history[-1]['train_loss']:.4f} dev_acc={history[-1]['dev_accuracy']} "
                  f"({time.time() - started:.0f}s)", flush=True)
        if student.patience is not None and epoch - best["epoch"] >= student.patience:
            break  # every worker saw the same dev scores, so all stop together
    engine.module.load_state_dict(best["state"])
    train_seconds = time.time() - started

    # 3. The test split, with the state chosen on dev (and that state's dev probabilities).
    engine.eval()
    dev_predictions = _dev_predictions(worker, dev, best["dev_probs"])
    matrix, _, _ = _scores(engine, worker, worker.test, len(labels))
    metrics = {
        "seed": seed,
        **_classification_metrics(matrix, labels),
        "probe": {**_classification_metrics(probe_matrix, labels), "l2": float(l2.item())},
        "majority": _majority(label_counts, matrix, labels),
        "train_examples": rows,
        "train_rows_per_worker": shares,
        "dev_examples": dev_rows,
        "test_examples": int(matrix.sum()),
        "best_epoch": best["epoch"],
        "epochs_run": len(history),
        "dev_accuracy": _rounded(best["dev_accuracy"]),
        **plan,
        "history": history,
        "pooling": frozen.pooling + ("+normalise" if frozen.normalise else ""),
        "train_seconds": round(train_seconds, 2),
        "probe_seconds": round(probe_seconds, 2),
        "precision": student.precision,
    }
    if rank == 0:
        with tempfile.TemporaryDirectory() as folder:
            if entry["save_model"]:
                save_student(engine.module, worker.tokenizer, labels, folder)
            Path(folder, "metrics.json").write_text(json.dumps(metrics, indent=1))
            Path(folder, DEV_PREDICTIONS).write_text(json.dumps(dev_predictions))
            ray.train.report({**metrics, "student": entry["name"]},
                             checkpoint=ray.train.Checkpoint.from_directory(folder))
    else:
        ray.train.report({**metrics, "student": entry["name"]})
    engine.destroy()


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def _classification_metrics(matrix: np.ndarray, labels: list[str]) -> dict[str, Any]:
    from raydag.evaluate import accuracy, macro_f1, per_class_f1

    return {"accuracy": accuracy(matrix), "macro_f1": macro_f1(matrix),
            "per_class_f1": dict(zip(labels, (round(f, 4) for f in per_class_f1(matrix)))),
            "predicted": dict(zip(labels, (int(c) for c in matrix.sum(axis=0)))),
            "confusion_matrix": matrix.tolist()}


def _majority(counts: np.ndarray, matrix: np.ndarray, labels: list[str]) -> dict[str, Any]:
    """The majority-class baseline: the training rows' most common label (``counts``: rows per
    label, in the job's order), on the test split."""
    label = labels[int(np.argmax(counts))]  # ties: the first in the job's label order
    total = matrix.sum()
    return {"label": label,
            "accuracy": float(matrix[labels.index(label)].sum() / total) if total else 0.0}


def save_student(model: StudentClassifier, tokenizer: Any, labels: list[str], folder: str) -> None:
    """Save a trained student: the encoder (``model.safetensors``, float32), the head and
    ``student.json`` (labels, pooling), loadable by :func:`load_student`."""
    from safetensors.torch import save_file

    model.encoder.float().save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    save_file({k: v.float().contiguous() for k, v in model.head.state_dict().items()},
              str(Path(folder, "head.safetensors")))
    Path(folder, "student.json").write_text(json.dumps(
        {"labels": labels, "pooling": model.pooling, "normalise": model.normalise}, indent=1))


def load_student(folder: str) -> tuple[Any, StudentClassifier, list[str]]:
    """Tokenizer, model (float32, eval mode) and labels of a student saved by
    :func:`save_student` (in a local folder, or on a store: then copied to a temporary folder
    first)."""
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    if is_uri(folder):
        import pyarrow.fs

        where, filesystem = arrow(location(folder))
        local = tempfile.mkdtemp(prefix="raydag-student-")
        pyarrow.fs.copy_files(where, local, source_filesystem=filesystem)
        folder = local

    meta = json.loads(Path(folder, "student.json").read_text())
    model = StudentClassifier(AutoModel.from_pretrained(folder, local_files_only=True),
                              len(meta["labels"]), meta["pooling"], meta["normalise"])
    model.head.load_state_dict(load_file(str(Path(folder, "head.safetensors"))))
    return AutoTokenizer.from_pretrained(folder, local_files_only=True), model.float().eval(), meta["labels"]


def dev_split(labels: list[str], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Positions of the train and dev rows of a labelled sample: ``round(fraction * n)`` dev
    rows, each label giving about its share (seeded), but never a label's only row. Where the
    shares round to fewer rows (many labels with a row or two each), the rest come from labels
    with a row to spare, one per label.

    Example:
        >>> train, dev = dev_split(["a"] * 10 + ["b"] * 5 + ["c"], 0.2, 0)
        >>> len(train), len(dev), 15 in train
        (13, 3, True)
    """
    rng = np.random.default_rng(seed)
    by_label: dict[str, list[int]] = {}
    for i, y in enumerate(labels):
        by_label.setdefault(y, []).append(i)
    want = int(round(fraction * len(labels)))
    dev: list[int] = []
    spare: list[list[int]] = []
    for rows in by_label.values():
        rows = rng.permutation(rows).tolist()
        take = min(len(rows) - 1, int(round(fraction * len(rows))))
        dev += rows[:take]
        if len(rows) - take > 1:
            spare.append(rows[take:])
    for index in rng.permutation(len(spare)).tolist()[: max(0, want - len(dev))]:
        dev.append(spare[index][0])
    chosen = set(dev)
    return [i for i in range(len(labels)) if i not in chosen], sorted(dev)


def student_runs(names: list[str], raw, synthetic, dev, student: StudentConfig) -> list[dict[str, Any]]:
    """The students to train, one per name and seed (see :func:`fit_students`), with their
    rows tokenised in Ray Data (:func:`tokenised`).

    ``raw`` and ``dev`` are frames with ``text`` and ``label``; ``synthetic`` is one too, or a
    Ray Dataset (the run's accepted rows, never gathered on the driver), or ``None``. The dev
    split is ``dev`` (the job's ``data.dev_path``) or, per seed, ``student.dev_fraction`` of
    the raw sample (:func:`dev_split`); raw and mixed students then train on the rest of the
    raw sample, synthetic ones on every synthetic row.

    Returns:
        Per name and seed: ``name``, ``seed``, ``train`` and ``dev`` (tokenised datasets),
        ``train_rows`` and ``dev_rows`` (their sizes).

    Raises:
        RaydagError: A student with no training rows.
    """
    import pandas as pd
    import ray

    def frame_rows(frame):
        return tokenised(ray.data.from_pandas(frame[["text", "label"]].reset_index(drop=True)),
                         student)

    tokenised_synthetic, synthetic_rows = None, 0
    if synthetic is not None and {"synthetic", "mixed"} & set(names):
        tokenised_synthetic = (frame_rows(synthetic) if isinstance(synthetic, pd.DataFrame)
                               else tokenised(synthetic, student))
        synthetic_rows = tokenised_synthetic.count()
    fixed_dev = frame_rows(dev) if dev is not None else None
    runs = []
    for seed in student.seeds:
        if dev is not None:
            raw_train, raw_dev, dev_rows = frame_rows(raw), fixed_dev, len(dev)
        else:
            train_at, dev_at = dev_split(raw["label"].tolist(), student.dev_fraction, seed)
            raw_train, raw_dev, dev_rows = frame_rows(raw.iloc[train_at]), frame_rows(raw.iloc[dev_at]), len(dev_at)
        raw_rows = len(raw) if dev is not None else len(train_at)
        for name in names:
            if name == "raw":
                rows, count = raw_train, raw_rows
            elif name == "synthetic":
                rows, count = tokenised_synthetic, synthetic_rows
            else:
                rows, count = raw_train.union(tokenised_synthetic) if synthetic_rows else raw_train, \
                    raw_rows + synthetic_rows
            if rows is None or not count:
                raise RaydagError(f"student '{name}': no training rows (did every generation fail?)")
            runs.append({"name": name, "seed": seed, "train": rows, "train_rows": count,
                         "dev": raw_dev, "dev_rows": dev_rows})
    return runs


def tokenised(rows, student: StudentConfig):
    """A dataset of ``text`` and ``label`` rows, tokenised for the student in Ray Data tasks:
    ``key`` (a digest of the text), ``input_ids`` (truncated to ``student.max_length``, not
    padded) and ``label``; materialized, in the input's order."""

    with preserving_order():
        return rows.select_columns(["text", "label"]).map_batches(
            _tokenise, fn_kwargs={"model": student.model, "max_length": student.max_length},
            batch_format="pandas").materialize()


def _tokenise(batch, *, model: str, max_length: int):
    """Ray Data task: token ids of each text (see :func:`tokenised`)."""
    import pandas as pd

    from raydag.data import stable_hash

    texts = [str(text) for text in batch["text"]]
    ids = _tokenizer(model)(texts, truncation=True, max_length=max_length)["input_ids"]
    return pd.DataFrame({"key": [stable_hash(text) for text in texts],
                         "input_ids": [np.asarray(row, dtype=np.int32) for row in ids],
                         "label": [str(label) for label in batch["label"]]})


@functools.lru_cache(maxsize=4)
def _tokenizer(model: str):
    """The student's tokenizer, loaded once per Ray worker process."""
    from transformers import AutoTokenizer

    from raydag.models import resolve_model

    path = resolve_model(model)
    return AutoTokenizer.from_pretrained(path, local_files_only=os.path.isdir(path))


def worker_shares(rows, count: int, world: int) -> list:
    """Cut a tokenised, materialized dataset of ``count`` rows into ``world`` shares of
    ``count // world`` or one more rows, in order (Ray Data's ``split_at_indices``), so every
    worker trains each student on its own share. With fewer rows than workers the rows are
    repeated until each worker has one.

    Example:
        >>> import ray
        >>> [s.count() for s in worker_shares(ray.data.range(7).materialize(), 7, 3)]  # doctest: +SKIP
        [3, 2, 2]
    """
    if 0 < count < world:
        copies = -(-world // count)
        rows = rows.union(*[rows] * (copies - 1))
        count *= copies
    sizes = [count // world + (rank < count % world) for rank in range(world)]
    with preserving_order():
        return rows.split_at_indices(np.cumsum(sizes)[:-1].tolist())


def fit_students(
    runs: list[dict[str, Any]],
    test,
    *,
    label_set: list[str],
    student: StudentConfig,
    storage_dir,
    run_name: str = "students",
) -> list[dict[str, Any]]:
    """Fine-tune one student per entry of ``runs`` with Ray Train + DeepSpeed, in one run
    (one worker group, started once), each next to its baselines, and evaluate on test.

    ``student.num_workers``, ``student.use_gpu`` and ``student.precision`` are taken as given
    (see :func:`raydag.resources.student_workers` and :func:`raydag.resources.student_precision`
    for how a job's ``null`` / ``auto`` are decided). Every split reaches the workers as the
    trainer's ``datasets``, one share per worker (:func:`worker_shares`).

    Args:
        runs: As :func:`student_runs` returns them; the dev rows choose the probe's L2 and the
            epoch.
        test: The test split: a frame with ``text`` and ``label``.
        label_set: The job's labels.
        student: The recipe's settings.
        storage_dir: Where Ray Train keeps the run and each student's checkpoint: a local
            folder or a store's URI (:func:`raydag.storage.location`).
        run_name: Ray Train run name (a folder of ``storage_dir``).

    Returns:
        Per entry, in order: metrics (``accuracy``, ``macro_f1``, ``per_class_f1``,
        ``predicted``, ``probe``, ``majority``, ``best_epoch``, ``train_rows_per_worker``...)
        and ``checkpoint``, the folder (with the saved student for the first seed of each
        name).

    Raises:
        RaydagError: When a set has nothing to train on or training fails.
    """
    import ray
    from ray.train import DataConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    for run in runs:
        if not run["train_rows"]:
            raise RaydagError(f"student '{run['name']}': no training rows")
    world = student.num_workers
    datasets: dict[str, Any] = {}

    def add(kind: str, part: int, rows, count: int) -> None:
        for rank, share in enumerate(worker_shares(rows, count, world)):
            datasets[shard_name(kind, part, rank)] = share

    add("test", 0, tokenised(ray.data.from_pandas(test[["text", "label"]].reset_index(drop=True)),
                             student), len(test))
    dev_parts: dict[int, int] = {}  # id of a dev dataset -> its part (seeds may share one)
    entries, first_seed = [], {}
    for part, run in enumerate(runs):
        if id(run["dev"]) not in dev_parts:
            dev_parts[id(run["dev"])] = len(dev_parts)
            add("dev", dev_parts[id(run["dev"])], run["dev"], run["dev_rows"])
        add("train", part, run["train"], run["train_rows"])
        first_seed.setdefault(run["name"], run["seed"])
        entries.append({"name": run["name"], "seed": run["seed"],
                        "save_model": first_seed[run["name"]] == run["seed"],
                        "train_part": part, "train_rows": run["train_rows"],
                        "dev_part": dev_parts[id(run["dev"])], "dev_rows": run["dev_rows"]})
    config = {"student": student.model_dump(), "labels": label_set, "students": entries}
    storage = location(storage_dir)
    where, filesystem = arrow(storage)
    where = os.path.abspath(where) if filesystem is None else where
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=world, use_gpu=bool(student.use_gpu)),
        run_config=RunConfig(name=run_name, storage_path=where, storage_filesystem=filesystem),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=[]),  # already one share per worker
    )
    names = ", ".join(dict.fromkeys(run["name"] for run in runs))
    try:
        result = trainer.fit()  # Ray Train raises the training error itself
    except Exception as err:
        raise RaydagError(f"student(s) {names} failed to train: {err}") from err
    out: dict[tuple[str, int], dict[str, Any]] = {}
    for checkpoint, metrics in result.best_checkpoints or []:
        key = (metrics.get("student"), metrics.get("seed"))
        out[key] = {"name": key[0], **{k: v for k, v in metrics.items()
                                       if not k.startswith("_") and k != "student"}}
        out[key]["checkpoint"] = (checkpoint.path if filesystem is None else  # its URI
                                  str(storage / checkpoint.path[len(where):].lstrip("/")))
    missing = [f"{run['name']} seed {run['seed']}" for run in runs
               if (run["name"], run["seed"]) not in out]
    if missing:
        raise RaydagError(f"student(s) {missing} reported no checkpoint")
    return [out[(run["name"], run["seed"])] for run in runs]


class StudentScorer:
    """Ray Data actor: ``log2_p_label``, the log2 probability a trained student gives each row's
    ``label`` for its ``text``; or, for rows without a label, ``probs``: its probability of
    every label (in the order of ``labels``).

    Args:
        checkpoint: Folder of a student saved by :func:`save_student`.
        max_length: Tokens per text after truncation.
        device: ``cpu`` or ``cuda``; default the GPU when the process sees one.
        labels: The order of ``probs``; default the student's own.
    """

    def __init__(self, checkpoint: str, max_length: int = 128, device: str | None = None,
                 labels: tuple[str, ...] | None = None) -> None:
        self._device = model_device(device)
        self._tokenizer, self._model, own = load_student(checkpoint)
        self._model = self._model.to(self._device)
        self._label2id = {label: i for i, label in enumerate(own)}
        self._columns = [self._label2id[label] for label in (labels or own)]
        self._max_length = max_length

    def __call__(self, batch):
        enc = self._tokenizer([str(t) for t in batch["text"]], padding=True, truncation=True,
                              max_length=self._max_length, return_tensors="pt").to(self._device)
        with torch.no_grad():
            logp = torch.log_softmax(self._model(**enc).float(), dim=-1).cpu()
        out = batch.copy()
        if "label" not in batch:
            out["probs"] = list(logp.exp()[:, self._columns].numpy())
            return out
        index = torch.tensor([self._label2id[str(label)] for label in batch["label"]])
        out["log2_p_label"] = (logp[torch.arange(len(index)), index] / np.log(2)).numpy()
        return out


def student_probs(texts: list[str], labels: list[str], checkpoint: str) -> np.ndarray:
    """A trained student's probability of each of ``labels`` (columns) for each text (rows),
    scored as :func:`student_log2_probs` scores."""
    import pandas as pd

    from raydag.stages import map_with_model

    if not texts:
        return np.zeros((0, len(labels)))
    out = map_with_model(pd.DataFrame({"text": texts}), StudentScorer,
                         {"checkpoint": checkpoint, "labels": tuple(labels)})
    return np.stack([np.asarray(p, dtype=float) for p in out["probs"]])


def student_log2_probs(texts: list[str], labels: list[str], checkpoint: str, *,
                       threads: int | None = None) -> np.ndarray:
    """log2 p(label | text) under a trained student, scored by Ray Data actors (one per GPU on
    GPU clusters, else one CPU actor)."""
    import pandas as pd

    from raydag.stages import map_with_model

    if not texts:
        return np.zeros(0)
    out = map_with_model(pd.DataFrame({"text": texts, "label": labels}), StudentScorer,
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
