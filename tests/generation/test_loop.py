"""`EngineLoop`: prompts submitted from other threads join the running rows, answer as `Engine.generate` answers
them (greedy, and sampled with a row's own settings whatever shares its batch), and a cancelled prompt leaves its
row and cache blocks at once."""

import threading

from test_engine import tiny, workload

from lit_mistral.generation.engine import Engine
from lit_mistral.generation.loop import EngineLoop
from lit_mistral.generation.session import Sampling, Session


def collect(loop: EngineLoop, prompt, max_new, sampling=None):
    """Submit; returns (tokens streamed, the Event set at the end, [the Answer])."""
    tokens, done, answer = [], threading.Event(), []
    key = loop.submit(prompt, max_new, sampling, tokens.append, lambda a: (answer.append(a), done.set()))
    return key, tokens, done, answer


def test_submitted_prompts_answer_as_generate_and_a_cancelled_one_frees_its_row():
    model = tiny()
    prompts, news = workload(6)
    reference = Engine(model, max_rows=3, max_tokens=512).generate(prompts, news)
    loop = EngineLoop(Session(Engine(model, max_rows=3, max_tokens=512)))
    try:
        runs = [collect(loop, p, n) for p, n in zip(prompts, news)]
        long_key, _, long_done, long_answer = collect(loop, prompts[0], 300)
        loop.cancel(long_key)
        for (_, tokens, done, answer), expected in zip(runs, reference):
            assert done.wait(60)
            assert tokens == answer[0].tokens == expected.tokens
        assert long_done.wait(60) and long_answer[0].finish == "cancelled"
        state = loop.load()
        assert state["cancelled"] == 1 and state["running_rows"] == 0
        assert state["free_blocks"] == state["total_blocks"] and state["free_rows"] == 3
        # the engine's work so far, as /health shows it: every prompt was prefilled, every answer's later tokens
        # decoded (the first comes from the prefill; the cancelled one may not have begun)
        assert state["prompt_tokens"] >= sum(map(len, prompts)) and state["prefills"] >= 1
        assert state["rows"] >= sum(news) - len(news) and state["steps"] >= max(news) - 1 and state["busy_s"] > 0
    finally:
        loop.close(timeout=10)


def test_a_rows_own_sampling_gives_its_answer_whatever_shares_its_batch():
    model = tiny()
    prompts, _ = workload(4)
    own = Sampling(temperature=0.8, top_p=0.9, top_k=20, seed=11)
    loop = EngineLoop(Session(Engine(model, max_rows=4, max_tokens=512)))
    try:
        _, alone, done, _ = collect(loop, prompts[0], 12, own)
        assert done.wait(60)
        runs = [collect(loop, p, 12, own if i == 0 else Sampling(seed=i)) for i, p in enumerate(prompts)]
        for _, _, done, _ in runs:
            assert done.wait(60)
        assert runs[0][1] == alone and len(alone) == 12
        assert runs[1][1] != alone  # another seed, another prompt: another answer
    finally:
        loop.close(timeout=10)


def test_the_relay_hands_another_threads_items_over_in_order_with_few_wakeups():
    """`Relay`: items put from another thread (the engine loop's) reach their asyncio queues in order, with one
    event-loop wake-up per batch that arrived meanwhile, not one per item."""
    import asyncio

    from lit_mistral.generation.loop import Relay

    async def main():
        relay, queues = Relay(asyncio.get_running_loop()), [asyncio.Queue(), asyncio.Queue()]

        def engine_steps():
            for i in range(2000):
                relay.put(queues[i % 2], i)

        await asyncio.to_thread(engine_steps)
        got = [[await q.get() for _ in range(1000)] for q in queues]
        return got, relay.wakeups

    got, wakeups = asyncio.run(main())
    assert got == [list(range(0, 2000, 2)), list(range(1, 2000, 2))]
    assert 1 <= wakeups < 500, wakeups
