"""Multi-turn conversations: reading and checking both shapes (messages and sharegpt), every problem of every row
collected, roles normalized. (Their chat formats are in test_chat_formats.py.)"""

import pytest

from lit_mistral.data.conversations import Conversation, Message, read_conversations
from lit_mistral.errors import LitMistralError, raise_problems


def rows(*records) -> list[tuple[str, object]]:
    return [(f"chat.jsonl:{i}", r) for i, r in enumerate(records, start=1)]


def msgs(*pairs) -> list[dict]:
    return [{"role": role, "content": content} for role, content in pairs]


GOOD = {"messages": msgs(("user", "Hi"), ("assistant", "Hello."))}
GOOD_SHAREGPT = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]}


# -- reading and checking ------------------------------------------------------------------------------------------


def test_detects_each_shape_and_normalizes_roles():
    read = read_conversations(rows(GOOD, {**GOOD, "category": "greeting"}))
    assert read.format == "messages" and read.problems == []
    assert read.conversations[1] == Conversation([Message("user", "Hi"), Message("assistant", "Hello.")],
                                                 "chat.jsonl:2", "greeting")
    sharegpt = {"conversations": [{"from": "system", "value": "Be kind."}, {"from": "human", "value": "Hi"},
                                  {"from": "gpt", "value": "Hello."}, {"from": "user", "value": "Bye"},
                                  {"from": "assistant", "value": "Bye!"}]}
    read = read_conversations(rows(sharegpt))
    assert read.format == "sharegpt" and read.problems == []
    assert [(m.role, m.content) for m in read.conversations[0].messages] == [
        ("system", "Be kind."), ("user", "Hi"), ("assistant", "Hello."), ("user", "Bye"), ("assistant", "Bye!")]


def test_forcing_a_shape():
    assert read_conversations(rows(GOOD_SHAREGPT), format="sharegpt").format == "sharegpt"
    read = read_conversations(rows(GOOD, GOOD_SHAREGPT), format="sharegpt")
    assert [c.where for c in read.conversations] == ["chat.jsonl:2"]
    assert read.problems == ["chat.jsonl:1: field 'conversations' is missing (format='sharegpt'); the row has "
                             "'messages', the messages shape: set the format to 'messages', or leave it out to "
                             "detect it"]
    with pytest.raises(LitMistralError, match="format='openai': unknown conversation format. Fix: use one of "
                                              "messages, sharegpt"):
        read_conversations(rows(GOOD), format="openai")


def bad(*turns, key="messages"):
    return {key: list(turns)}


# (case, rows after a good one, need_answer, the one problem expected)
BAD = [
    ("unknown-role", bad({"role": "user", "content": "Hi"}, {"role": "bot", "content": "Hello."}), True,
     "chat.jsonl:2: messages[1]: unknown role 'bot'; allowed: system, user, assistant"),
    ("empty-content", bad({"role": "user", "content": " \n"}, {"role": "assistant", "content": "Hello."}), True,
     "chat.jsonl:2: messages[0]: 'content' is empty"),
    ("content-not-string", bad({"role": "user", "content": [{"type": "text"}]}, {"role": "assistant", "content": "x"}),
     True, "chat.jsonl:2: messages[0]: 'content' must be a string, got list"),
    ("no-content", bad({"role": "user"}, {"role": "assistant", "content": "x"}), True,
     "chat.jsonl:2: messages[0] has no 'content'"),
    ("turn-not-object", bad("Hi", {"role": "assistant", "content": "x"}), True,
     "chat.jsonl:2: messages[0] must be an object with 'role' and 'content', got str"),
    ("not-a-list", {"messages": "Hi"}, True, "chat.jsonl:2: 'messages' must be a list of turns, got str"),
    ("empty-list", {"messages": []}, True, "chat.jsonl:2: 'messages' is empty"),
    ("two-user-turns", bad(*msgs(("user", "Hi"), ("user", "Hello?"), ("assistant", "Yes."))), True,
     "chat.jsonl:2: messages[1] is 'user' where an assistant turn belongs: after an optional system turn first, "
     "turns alternate user, assistant, user, ... starting with user"),
    ("assistant-first", bad(*msgs(("system", "Be kind."), ("assistant", "Hi"), ("user", "Hello."))), False,
     "chat.jsonl:2: messages[1] is 'assistant' where a user turn belongs"),
    ("system-later", bad(*msgs(("user", "Hi"), ("system", "Be kind."), ("assistant", "Hello."))), True,
     "chat.jsonl:2: messages[1] is 'system' where an assistant turn belongs"),
    ("only-system", bad(*msgs(("system", "Be kind."))), True, "chat.jsonl:2: 'messages' has no user turn"),
    ("training-ends-with-user", bad(*msgs(("user", "Hi"), ("assistant", "Hello."), ("user", "Bye"))), True,
     "chat.jsonl:2: ends with a user turn; training needs an assistant turn last (the answer to learn)"),
    ("prediction-ends-with-assistant", bad(*msgs(("user", "Hi"), ("assistant", "Hello."))), False,
     "chat.jsonl:2: ends with an assistant turn; to predict, the last turn must be the user's (the model writes "
     "the next assistant turn)"),
    ("row-not-object", ["Hi", "Hello."], True, "chat.jsonl:2: expected a JSON object with a 'messages' list "
     "(messages) or a 'conversations' list (sharegpt), got list"),
    ("category-not-string", {**GOOD, "category": 3}, True, "chat.jsonl:2: field 'category' must be a string, got int"),
    ("mixed-shapes", GOOD_SHAREGPT, True, "chat.jsonl:2: has 'conversations' (sharegpt shape) but chat.jsonl:1 has "
     "'messages' (messages shape): one file must hold one shape"),
    ("mixed-with-an-instruction", {"instruction": "Hi", "context": ""}, False, "chat.jsonl:2: the file mixes shapes: "
     "this row has no 'messages' (its fields are 'instruction', 'context') but chat.jsonl:1 is a conversation "
     "(messages shape): one file must hold one shape, instruction records or conversations"),
]

BAD_SHAREGPT = [
    ("sharegpt-unknown-from", bad({"from": "human", "value": "Hi"}, {"from": "bot", "value": "Hello."},
                                  key="conversations"),
     "chat.jsonl:2: conversations[1]: unknown from 'bot'; allowed: system, human, user, gpt, assistant"),
    ("sharegpt-no-value", bad({"from": "human", "text": "Hi"}, {"from": "gpt", "value": "Hello."}, key="conversations"),
     "chat.jsonl:2: conversations[0] has no 'value'"),
    ("sharegpt-no-from", bad({"value": "Hi"}, {"from": "gpt", "value": "Hello."}, key="conversations"),
     "chat.jsonl:2: conversations[0] has no 'from'"),
    ("sharegpt-order", bad({"from": "gpt", "value": "Hi"}, {"from": "human", "value": "Hello."}, key="conversations"),
     "chat.jsonl:2: conversations[0] is 'gpt' where a user turn belongs"),
    ("sharegpt-not-a-list", {"conversations": {"from": "human"}},
     "chat.jsonl:2: 'conversations' must be a list of turns, got dict"),
    ("sharegpt-mixed", GOOD, "chat.jsonl:2: has 'messages' (messages shape) but chat.jsonl:1 has 'conversations' "
     "(sharegpt shape): one file must hold one shape"),
]


@pytest.mark.parametrize("case, record, need_answer, expected", BAD, ids=[c[0] for c in BAD])
def test_each_bad_record_gets_one_message_naming_where(case, record, need_answer, expected):
    good = GOOD if need_answer else {"messages": msgs(("user", "Hi"))}
    read = read_conversations(rows(good, record, good), need_answer=need_answer)
    assert len(read.problems) == 1 and read.problems[0].startswith(expected), read.problems
    assert [c.where for c in read.conversations] == ["chat.jsonl:1", "chat.jsonl:3"]  # the bad row alone is left out


@pytest.mark.parametrize("case, record, expected", BAD_SHAREGPT, ids=[c[0] for c in BAD_SHAREGPT])
def test_each_bad_sharegpt_record_gets_one_message(case, record, expected):
    read = read_conversations(rows(GOOD_SHAREGPT, record))
    assert read.format == "sharegpt"
    assert len(read.problems) == 1 and read.problems[0].startswith(expected), read.problems


def test_problems_of_every_row_are_collected():
    read = read_conversations(rows({"instruction": "Hi", "response": "Hello."}, GOOD, bad({"role": "bot"})))
    assert read.problems == [
        "chat.jsonl:1: the file mixes shapes: this row has no 'messages' (its fields are 'instruction', 'response') "
        "but chat.jsonl:2 is a conversation (messages shape): one file must hold one shape, instruction records or "
        "conversations",
        "chat.jsonl:3: messages[0]: unknown role 'bot'; allowed: system, user, assistant",
        "chat.jsonl:3: messages[0] has no 'content'",
    ]
    with pytest.raises(LitMistralError, match=r"(?s)3 problems found:\n  chat.jsonl:1: .*\n  chat.jsonl:3: "):
        raise_problems(read.problems, "Fix: correct these conversations.")
    no_shape = read_conversations(rows({"instruction": "Hi", "response": "Hello."}))
    assert no_shape.format is None and no_shape.problems == [
        "chat.jsonl:1: expected a 'messages' list (messages) or a 'conversations' list (sharegpt); the row's fields "
        "are 'instruction', 'response'"]
