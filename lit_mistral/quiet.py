"""Messages of other libraries that say nothing to a lit_mistral user, filtered where they start, each with why it
is harmless; anything not listed here is shown. A user reads a line that says "Failed" as a failure, so a log with
such lines hides the ones that matter."""

import logging
import re
import warnings

# logger -> what it says that is harmless
HARMLESS_LOGS = {
    # at import on CPUs with AVX-512 BF16, bitsandbytes tries an optional faster 4-bit matmul from the `kernels`
    # package (fetched from a hub) and falls back to its own, which is what runs without it
    "bitsandbytes.backends.cpu.ops": r"Failed to load CPU gemm_4bit_forward",
    # Liger probes the kernels of every vendor when its ops are first used; those of other hardware (or of a
    # library not installed) cannot import, as expected, and the kernels for this GPU run
    "liger_kernel.backends.registry": r"Backend impl .* could not be imported",
    # Lightning advertises its cloud logger at every Trainer whose loggers are not that one; runs log to TensorBoard
    "lightning.pytorch.utilities.rank_zero": r"Tip: For seamless cloud logging",
}
# warnings (message patterns) that are harmless
HARMLESS_WARNINGS = [
    # peft reads transformers' property by its old name, which transformers renamed; nothing a user can change
    r"`is_gradient_checkpointing` is deprecated",
    # Lightning's batch flattening (lightning/pytorch/utilities/_pytree.py) makes torch's `LeafSpec`, which newer
    # torch deprecates; nothing a user can change
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
]


class DropMatching(logging.Filter):
    """Drops the records whose message matches `pattern`."""

    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def quiet_known_noise() -> None:
    """Filter the harmless messages above; call before the libraries that print them are imported."""
    for name, pattern in HARMLESS_LOGS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropMatching) and f.pattern.pattern == pattern for f in logger.filters):
            logger.addFilter(DropMatching(pattern))
    for pattern in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
