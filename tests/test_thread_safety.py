"""One loaded model shared by 8 threads (as gpt2-serve's workers share it): concurrent calls equal sequential ones.

Greedy, sampling, beam search, streams, next-token tables and the tokenizer, all at once.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import gpt2onnx
from conftest import RandomGPT2

PROMPT = "Artificial intelligence"


def test_concurrent_calls_give_what_the_same_calls_give_one_at_a_time(tiny_gpt2: RandomGPT2) -> None:
    model = gpt2onnx.load(tiny_gpt2.bundle, threads=1)
    calls: list[Callable[[], Any]] = [
        lambda: model.generate(PROMPT, max_new_tokens=30).texts,
        lambda: model.generate(["Hello", PROMPT], max_new_tokens=30, do_sample=True, seed=1).texts,
        lambda: model.generate(PROMPT, max_new_tokens=10, num_beams=3, num_return_sequences=2).texts,
        lambda: model.generate(PROMPT, max_new_tokens=8, num_beams=5, do_sample=True, seed=3).texts,
        lambda: "".join(model.stream("Hello", max_new_tokens=30, do_sample=True, seed=2)),
        lambda: [row.token_id for row in model.next_token_probs(PROMPT)],
        lambda: model.tokenizer.decode(model.tokenizer.encode("ArtificCial intElliGence")),
    ]
    expected = [call() for call in calls]
    with ThreadPoolExecutor(max_workers=8) as pool:
        for _ in range(3):
            futures = [pool.submit(call) for call in calls * 3]
            assert [future.result() for future in futures] == expected * 3
