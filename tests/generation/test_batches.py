"""Static batches through transformers' `generate`: a left-padded batch answers each prompt as it would be answered
alone, each row within its own limit; a prompt with no room in the context window gets a "skipped" record; answers
cut at the first EOS; the output row of a conversation."""

from conftest import answer_alone, prompt_items

from lit_mistral.data.conversations import Conversation, Message
from lit_mistral.data.prompt_batches import collate_prompts
from lit_mistral.generation.batches import answer_text, generate, record, row_limits

ROWS = [0, 5, 12]  # demo records whose instructions differ in length: the batch is left-padded


def test_a_padded_batch_answers_each_prompt_as_alone_within_its_own_limit(tiny_lm, demo_records):
    model, tokenizer = tiny_lm
    items = prompt_items(tokenizer, [demo_records[i] for i in ROWS], limits=[None, 2, 9])
    batch = collate_prompts(items, tokenizer.pad_token_id)
    assert len({len(it["input_ids"]) for it in items}) == 3
    assert row_limits(batch, 5) == [5, 2, 5]  # a row's own limit, within the settings'

    records = generate(model, tokenizer, batch, max_new_tokens=5, do_sample=False, temperature=1.0, top_p=1.0,
                       top_k=0)
    assert [r["index"] for r in records] == [0, 1, 2]
    for r, it, limit in zip(records, items, [5, 2, 5]):
        text, n = answer_alone(model, tokenizer, it["input_ids"], limit)
        assert (r["response"], r["response_tokens"], r["prompt_tokens"]) == (text, n, len(it["input_ids"]))
        assert r["finish"] == ("eos" if n < limit else "length")
        assert r["instruction"] == it["example"].instruction and "error" not in r


def test_a_prompt_without_room_in_the_context_is_skipped_and_the_others_answered(tiny_lm, demo_records):
    model, tokenizer = tiny_lm
    items = prompt_items(tokenizer, [demo_records[i] for i in ROWS])
    lengths = [len(it["input_ids"]) for it in items]
    longest = lengths.index(max(lengths))
    context = max(lengths) + 3  # 4 new tokens fit every prompt but the longest
    records = generate(model, tokenizer, collate_prompts(items, tokenizer.pad_token_id), max_new_tokens=4,
                       do_sample=False, temperature=1.0, top_p=1.0, top_k=0, context=context)

    skipped = records[longest]
    assert (skipped["finish"], skipped["response"], skipped["response_tokens"]) == ("skipped", None, 0)
    assert skipped["error"] == (f"the prompt has {max(lengths)} tokens; with max_new_tokens=4 it does not fit the "
                                f"model's context of {context} tokens. Fix: shorten it or lower "
                                "--model.generation.max_new_tokens.")
    for r, it in zip(records, items):
        if r is not skipped:
            assert (r["response"], r["response_tokens"]) == answer_alone(model, tokenizer, it["input_ids"], 4)


def test_answer_text_cuts_at_the_first_eos_or_at_the_limit(tiny_lm):
    _, tokenizer = tiny_lm
    words = tokenizer("reduce food waste", add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    assert answer_text(tokenizer, [*words, eos, *words], 10, {eos}) == ("reduce food waste", 3, "eos")
    assert answer_text(tokenizer, [*words, eos], 2, {eos}) == ("reduce food", 2, "length")
    assert answer_text(tokenizer, words[:1] + [7], 5, {eos, 7}) == ("reduce", 1, "eos")  # any of the ending tokens


def test_the_row_of_a_conversation_carries_its_messages():
    talk = Conversation([Message("system", "Be brief."), Message("user", "Hi"), Message("assistant", "Hello"),
                         Message("user", "Why?")])
    row = record(3, talk, 12, "Because.", 2, "eos")
    assert row == {"index": 3, "messages": talk.as_dicts(), "instruction": "Why?", "context": "",
                   "response": "Because.", "prompt_tokens": 12, "response_tokens": 2, "finish": "eos"}
