"""`Session`: prompts added in portions answer as one `Engine.generate` call does (greedy and sampled: a prompt's
key seeds it, not its portion), and a cancelled prompt, waiting or running, gives back its row and cache blocks."""

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
