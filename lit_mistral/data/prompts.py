"""Prompt styles: how one instruction record becomes the prompt text and the response text.

Each style is a small class in a registry, chosen by name (`--data.prompt_style mistral`). `apply` returns
`(prompt, response)`: the prompt is what the model sees at inference, the response is what it must learn to
generate after it (without the end-of-sequence token, which tokenization appends as an id, so that a literal
"</s>" in the data can never stand in for it).
"""

from typing import ClassVar

from lit_mistral.data.records import Example
from lit_mistral.errors import LitMistralError


class PromptStyle:
    """Turns an `Example` into `(prompt, response)` text."""

    name: ClassVar[str]
    # Whether the tokenizer should add its special tokens (BOS) to the prompt. Chat templates write their own.
    add_special_tokens: ClassVar[bool] = True

    def __init__(self, tokenizer=None) -> None:
        self.tokenizer = tokenizer

    def apply(self, example: Example) -> tuple[str, str]:
        raise NotImplementedError


class Mistral(PromptStyle):
    """`[INST] {instruction}` (+ a blank line and the context, only when there is one) ` [/INST] {response}`.

    The tokenizer adds `<s>`; tokenization appends `</s>`. This is the format of the Mistral-7B-Instruct models
    and of the seed recipe, without its bug of writing the word "None" for an empty context."""

    name = "mistral"

    def apply(self, example: Example) -> tuple[str, str]:
        user = example.instruction + (f"\n\n{example.context}" if example.context else "")
        return f"[INST] {user} [/INST]", f" {example.response}" if example.response is not None else ""


class Alpaca(PromptStyle):
    """The Stanford Alpaca template, with its "### Input:" section only when there is a context."""

    name = "alpaca"

    def apply(self, example: Example) -> tuple[str, str]:
        if example.context:
            prompt = (
                "Below is an instruction that describes a task, paired with an input that provides further context. "
                "Write a response that appropriately completes the request.\n\n"
                f"### Instruction:\n{example.instruction}\n\n### Input:\n{example.context}\n\n### Response:\n"
            )
        else:
            prompt = (
                "Below is an instruction that describes a task. "
                "Write a response that appropriately completes the request.\n\n"
                f"### Instruction:\n{example.instruction}\n\n### Response:\n"
            )
        return prompt, example.response or ""


class ChatTemplate(PromptStyle):
    """The tokenizer's own chat template: one user turn (instruction + context), one assistant turn."""

    name = "chat_template"
    add_special_tokens = False

    def __init__(self, tokenizer=None) -> None:
        super().__init__(tokenizer)
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise LitMistralError(
                "prompt_style 'chat_template' needs a tokenizer with a chat template, and this model's tokenizer has "
                "none. Fix: set --data.prompt_style to 'mistral' or 'alpaca'."
            )

    def apply(self, example: Example) -> tuple[str, str]:
        user = {"role": "user", "content": example.instruction + (f"\n\n{example.context}" if example.context else "")}
        prompt = self.tokenizer.apply_chat_template([user], tokenize=False, add_generation_prompt=True)
        if example.response is None:
            return prompt, ""
        full = self.tokenizer.apply_chat_template(
            [user, {"role": "assistant", "content": example.response}], tokenize=False
        )
        if not full.startswith(prompt):
            raise LitMistralError(
                f"{example.where}: the tokenizer's chat template renders the conversation so that it does not start "
                "with the rendered prompt, so the response cannot be separated for loss masking. "
                "Fix: use --data.prompt_style mistral or alpaca with this tokenizer."
            )
        response = full[len(prompt):]
        # The template closes the turn with its own end token (often the EOS text) and maybe a newline: cut from the
        # EOS text on, since tokenization appends the EOS id itself.
        eos = self.tokenizer.eos_token
        if eos and eos in response:
            response = response[: response.rindex(eos)]
        return prompt, response


PROMPT_STYLES: dict[str, type[PromptStyle]] = {cls.name: cls for cls in (Mistral, Alpaca, ChatTemplate)}


def check_prompt_style(name: str) -> None:
    if name not in PROMPT_STYLES:
        raise LitMistralError(
            f"data.prompt_style: unknown prompt style {name!r}. Fix: use one of {', '.join(sorted(PROMPT_STYLES))}."
        )


def prompt_style(name: str, tokenizer=None) -> PromptStyle:
    """The prompt style registered under `name`."""
    check_prompt_style(name)
    return PROMPT_STYLES[name](tokenizer)
