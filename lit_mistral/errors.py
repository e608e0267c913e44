"""The one exception type users see: what is wrong, where (file, line or key), and how to fix it."""

from collections.abc import Sequence


class LitMistralError(Exception):
    """A bad input or setting. The CLI prints the message alone (no traceback) and exits with status 2."""


def raise_problems(problems: Sequence[str], fix: str, limit: int = 20) -> None:
    """Raise one `LitMistralError` listing every problem found (the first `limit` of them), then the fix."""
    if not problems:
        return
    shown = "\n".join(f"  {p}" for p in problems[:limit])
    more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
    noun = "problem" if len(problems) == 1 else "problems"
    raise LitMistralError(f"{len(problems)} {noun} found:\n{shown}{more}\n{fix}")
