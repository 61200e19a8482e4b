"""The server's scheduler in process (serve/scheduler.py): how it admits requests into its one decode batch."""

from __future__ import annotations

import asyncio
import itertools

import gpt2onnx
from conftest import RandomGPT2
from gpt2onnx.serve.scheduler import Scheduler


def test_requests_arriving_together_are_prefilled_one_per_step(tiny_gpt2: RandomGPT2) -> None:
    """Three requests reach an idle batch at once: each prefill runs between two steps, so the first request's
    second token does not wait for the others' prefills (a running row waits for one prefill at most)."""
    model = gpt2onnx.load(tiny_gpt2.bundle, threads=1)
    events: list[str] = []

    async def serve() -> list[int]:
        scheduler = Scheduler(model, max_batch=4, queue_size=8)
        batch = scheduler.batch
        join, step = batch.join, batch.step
        batch.join = lambda generator: events.append("join") or join(generator)
        batch.step = lambda: events.append("step") or step()
        jobs = []
        with scheduler._lock:  # all three are waiting before the scheduler's thread looks
            for prompt in ("Hello", "The quick brown fox", "a"):
                generator = model.generator(max_new_tokens=5, min_new_tokens=5)
                generator.append_tokens(prompt)
                jobs.append(scheduler.submit(generator))
        tokens = []
        for job in jobs:
            tokens.append(sum([len(updates) async for updates in job.updates()]))
        await asyncio.to_thread(scheduler.close)
        return tokens

    assert asyncio.run(serve()) == [5, 5, 5]
    joins = [index for index, event in enumerate(events) if event == "join"]
    assert len(joins) == 3
    assert all(later - earlier >= 2 for earlier, later in itertools.pairwise(joins)), events
