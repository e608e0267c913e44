"""`Session`: prompts added in portions answer as one `Engine.generate` call does (greedy and sampled: a prompt's
key seeds it, not its portion), a cancelled prompt, waiting or running, gives back its row and cache blocks, and
prompts arriving one at a time (a server's) share their prefills within the session's patience."""

import torch
from test_engine import tiny, workload

from lit_mistral.generation.engine import Engine
from lit_mistral.generation.session import Session


def test_portions_answer_as_one_generate_call():
    model = tiny()
    prompts, news = workload(8)
    engine = Engine(model, max_rows=3, max_tokens=400)
    for sampled in (False, True):
        settings = dict(do_sample=sampled, temperature=0.9, top_k=20, seed=5)
        reference = engine.generate(prompts, news, **settings)
        session, answers = Session(engine, **settings), {}
        for start in range(0, len(prompts), 3):  # as predict adds each batch of its dataloader
            session.add(prompts[start:start + 3], news[start:start + 3], range(start, min(start + 3, len(prompts))))
            answers.update(session.run(starve=2))
        answers.update(session.run())
        assert [answers[i] for i in range(len(prompts))] == reference
        assert session.describe().startswith(f"{session.counts['steps']} decoding steps")


def test_cancelled_prompts_free_their_rows_and_blocks():
    engine = Engine(tiny(), max_rows=2, max_tokens=400)
    session = Session(engine)
    prompts, _ = workload(3)
    session.add(prompts, [50, 50, 50], [0, 1, 2])
    with torch.inference_mode(), engine._prepare():  # as `run` enters them
        session.step()
    held = session.load()
    assert held["running_rows"] == 2 and held["waiting"] == 1 and held["free_rows"] == 0
    assert session.cancel(2) and session.load()["waiting"] == 0  # out of the queue
    assert session.cancel(0) and session.cancel(1)  # out of their rows
    assert session.load() == {"running_rows": 0, "free_rows": 2, "waiting": 0, "free_blocks": held["total_blocks"],
                              "total_blocks": held["total_blocks"]}
    assert not session.cancel(0)  # neither waiting nor running any more


def test_a_prompt_arriving_alone_waits_patience_steps_to_share_a_prefill():
    """With 6 of 10 rows running (refill_rows 2), a prompt that arrives alone waits for another to share its prefill,
    up to `patience` decoding steps; two together go at once; without patience (predict) it goes at once."""
    engine = Engine(tiny(), max_rows=10, max_tokens=2000, refill_rows=2)
    prompts, _ = workload(9)

    def prefills_after(session, steps: int) -> int:
        with torch.inference_mode(), engine._prepare():
            for _ in range(steps):
                session.step()
        return session.counts["prefills"]

    for patience in (None, 3):
        session = Session(engine, patience=patience)
        session.add(prompts[:6], [100] * 6, range(6))
        assert prefills_after(session, 1) == 1 and session.load()["running_rows"] == 6
        session.add(prompts[6:7], [100], [6])
        if patience is None:
            assert prefills_after(session, 1) == 2
            continue
        assert prefills_after(session, 3) == 1  # waited 3 steps: the next step takes it
        assert prefills_after(session, 1) == 2 and session.load()["waiting"] == 0
        session.add(prompts[7:9], [100] * 2, [7, 8])  # two arrive together: a batch of refill_rows
        assert prefills_after(session, 1) == 3 and session.load()["running_rows"] == 9


def test_under_a_full_load_prefills_are_patience_steps_apart():
    """All rows busy and a queue: each row that frees up would be a prefill of its own. Two prompts arrive at step
    1 with one free row: the first goes at step 4 (it waited 3); the row that frees at step 4 takes the second at
    step 7, 3 steps after the last prefill, though it has waited longer."""
    engine = Engine(tiny(), max_rows=7, max_tokens=3000, refill_rows=3)
    prompts, _ = workload(8)
    session, prefills = Session(engine, patience=3), []
    session.add(prompts[:6], [100] * 5 + [6], range(6))  # the sixth ends after its 6 tokens, at step 4
    with torch.inference_mode(), engine._prepare():
        for step in range(9):
            if step == 1:
                session.add(prompts[6:8], [100, 100], [6, 7])
            session.step()
            prefills.append(session.counts["prefills"])
    assert prefills == [1, 1, 1, 1, 2, 2, 2, 3, 3]
