"""What a request to the OpenAI-shaped server (`serve.py`) may hold, and its checking before it reaches the engine:
the fields each endpoint takes and their types, the OpenAI fields accepted only at their neutral values, the
sampling and `max_tokens` a request asks for (unset fields take the config's `model.generation`), and the error
body every refusal is sent as.

Apart from `serve.py`, which carries the HTTP side (the gate, the routes, the streaming) and the server's life, so
that what a client may send is read in one place."""

import json
import secrets

from lit_mistral.generation.session import Sampling
from lit_mistral.serving import BadRequest

# accepted as OpenAI clients send them, only at these values (anything else is a 400 that names the field)
NEUTRAL = {"n": (None, 1), "best_of": (None, 1), "logprobs": (None, False, 0), "top_logprobs": (None, 0),
           "echo": (None, False), "suffix": (None, ""), "presence_penalty": (None, 0, 0.0),
           "frequency_penalty": (None, 0, 0.0), "logit_bias": (None, {}), "tools": (None, []),
           "tool_choice": (None, "none"), "parallel_tool_calls": (None, False, True), "functions": (None, []),
           "response_format": (None, {"type": "text"}), "user": None, "store": None, "metadata": None,
           "service_tier": None}
COMMON = {"model": str, "max_tokens": int, "max_completion_tokens": int, "temperature": (int, float),
          "top_p": (int, float), "top_k": int, "seed": int, "stop": (str, list), "stream": bool,
          "stream_options": dict}
FIELDS = {"chat": {**COMMON, "messages": list}, "completion": {**COMMON, "prompt": (str, list), "instruction": str,
                                                               "context": str}}


def error_body(message: str, param: str | None = None, kind: str = "invalid_request_error",
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def parse(raw: bytes, kind: str) -> dict:
    """The JSON object of a request, each known field of its type; unknown fields and unsupported values refused."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BadRequest(f"the body is not valid JSON ({err})") from None
    if not isinstance(body, dict):
        raise BadRequest(f"the body must be a JSON object, not {type(body).__name__}")
    fields = FIELDS[kind]
    for key, value in body.items():
        if key in NEUTRAL:
            if NEUTRAL[key] is not None and value not in NEUTRAL[key]:
                raise BadRequest(f"{key}={json.dumps(value)[:60]} is not supported by this server (supported: "
                                 f"{', '.join(json.dumps(v) for v in NEUTRAL[key] if v is not None)} or unset)", key)
            continue
        if key not in fields:
            raise BadRequest(f"unknown field {key!r}; this endpoint takes {', '.join(sorted(fields))}", key)
        wanted = fields[key]
        if value is not None and (not isinstance(value, wanted) or isinstance(value, bool) and wanted is not bool):
            names = " or ".join(t.__name__ for t in (wanted if isinstance(wanted, tuple) else (wanted,)))
            raise BadRequest(f"{key}: expected {names}, got {type(value).__name__}", key)
    return body


def sampling_of(body: dict, generation) -> tuple[Sampling | None, list[str]]:
    """The request's sampling (None: greedy) and stop strings. Unset fields take the config's
    `model.generation` values (greedy unless `do_sample`)."""
    default_t = generation.temperature if generation.do_sample else 0.0
    temperature = body.get("temperature")
    temperature = default_t if temperature is None else temperature
    top_p = body.get("top_p") if body.get("top_p") is not None else generation.top_p
    top_k = body.get("top_k") if body.get("top_k") is not None else generation.top_k
    if not 0 <= temperature <= 2:
        raise BadRequest(f"temperature={temperature}: expected 0 .. 2", "temperature")
    if not 0 < top_p <= 1:
        raise BadRequest(f"top_p={top_p}: expected 0 < top_p <= 1", "top_p")
    if top_k < -1:
        raise BadRequest(f"top_k={top_k}: expected >= 0 (0 or -1: off)", "top_k")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if len(stop) > 16 or not all(isinstance(s, str) and s for s in stop):
        raise BadRequest("stop: expected a non-empty string or a list of at most 16 of them", "stop")
    seed = body.get("seed")
    if temperature == 0:
        return None, stop
    return Sampling(float(temperature), float(top_p), max(0, top_k),
                    seed if seed is not None else secrets.randbelow(2**31)), stop


def max_tokens_of(body: dict, generation) -> int:
    value = body.get("max_completion_tokens") or body.get("max_tokens")
    value = generation.max_new_tokens if value is None else value
    if value < 1:
        raise BadRequest(f"max_tokens={value}: expected >= 1", "max_tokens")
    return value
