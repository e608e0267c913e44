"""What a request to the server may hold, checked without a server: unknown fields, wrong types and OpenAI fields
away from their neutral values are refused naming the field; unset sampling fields and max_tokens take the config's
`model.generation`; temperature 0 is greedy. (The HTTP side is in test_serve.py.)"""

import pytest

from lit_mistral.config import Generation
from lit_mistral.generation.session import Sampling
from lit_mistral.openai_requests import error_body, max_tokens_of, parse, sampling_of
from lit_mistral.serving import BadRequest


@pytest.mark.parametrize("raw,param,message", [
    (b'{"messages": [], "temprature": 1}', "temprature", "unknown field 'temprature'; this endpoint takes"),
    (b'{"messages": [], "max_tokens": true}', "max_tokens", "max_tokens: expected int, got bool"),
    (b'{"messages": [], "n": 2}', "n", "n=2 is not supported by this server (supported: 1 or unset)"),
    (b'[1]', None, "the body must be a JSON object, not list"),
    (b'{"messages": ', None, "the body is not valid JSON"),
])
def test_parse_refuses_naming_the_field(raw, param, message):
    with pytest.raises(BadRequest) as caught:
        parse(raw, "chat")
    assert (caught.value.param, caught.value.status) == (param, 400) and message in caught.value.message


def test_parse_keeps_known_fields_and_neutral_values():
    assert parse(b'{"prompt": "hi", "n": 1, "user": "x", "top_k": 3}', "completion") == {
        "prompt": "hi", "n": 1, "user": "x", "top_k": 3}


def test_sampling_and_max_tokens_default_to_the_config():
    greedy, sampled = Generation(), Generation(do_sample=True, temperature=0.5, top_p=0.9, top_k=7, max_new_tokens=9)
    assert sampling_of({}, greedy) == (None, [])
    assert sampling_of({"seed": 3, "stop": "END"}, sampled) == (Sampling(0.5, 0.9, 7, 3), ["END"])
    assert sampling_of({"temperature": 1, "top_k": -1, "seed": 1}, greedy)[0] == Sampling(1.0, 0.95, 0, 1)
    assert max_tokens_of({}, sampled) == 9
    assert max_tokens_of({"max_completion_tokens": 4, "max_tokens": 5}, sampled) == 4
    for body, param in [({"temperature": 3}, "temperature"), ({"top_p": 0}, "top_p"), ({"stop": [""]}, "stop")]:
        with pytest.raises(BadRequest, match=param):
            sampling_of(body, greedy)
    with pytest.raises(BadRequest, match="max_tokens=0: expected >= 1"):
        max_tokens_of({"max_tokens": 0}, greedy)
    assert error_body("no", "stop") == {"error": {"message": "no", "type": "invalid_request_error", "param": "stop",
                                                  "code": None}}
