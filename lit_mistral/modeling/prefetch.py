"""Imports and one-time work that building the model waits for, started in a background thread before the data's
setup, so that they overlap it instead of adding to the time to the first step.

Importing peft and Liger's patching module and Triton's first cache key (a SHA-256 of its compiler library, taken
when the first Triton kernel runs, in the first step) take seconds, while the data's setup before them (tokenizing
in Rust without holding the interpreter's lock) leaves the interpreter free. `build_model` waits for the thread
before its own imports, so nothing is imported by two threads at once from there on; a failure here is dropped (the
build's own import then raises its clear error)."""

import contextlib
import importlib
import threading

_thread: threading.Thread | None = None


def _work(modules: list[str], triton_key: bool) -> None:
    # a failure is dropped: the build imports the module again and says what is wrong; an older or newer Triton
    # without this cache key: its first kernel pays, as before
    for name in modules:
        with contextlib.suppress(Exception):
            importlib.import_module(name)
    if triton_key:
        with contextlib.suppress(Exception):
            from triton.runtime.cache import triton_key as key  # Triton >= 3.2: hashes its compiler once per process

            key()


def start(kernels: str | None, quantized: bool, on_cuda: bool, training: bool) -> None:
    """Start importing what `build_model` will need (peft; bitsandbytes if `quantized`; Liger's patching module if
    `kernels` are used: in training, or generating `on_cuda`) and, with Liger on CUDA, Triton's cache key. Once per
    process; a no-op after that."""
    global _thread
    if _thread is not None:
        return
    modules = ["peft", "peft.tuners.lora.layer"]
    if quantized:
        modules.append("bitsandbytes")
    liger = kernels == "liger" and (training or on_cuda)
    if liger:
        modules.append("liger_kernel.transformers.monkey_patch")
    _thread = threading.Thread(target=_work, args=(modules, liger and on_cuda), name="lit_mistral-prefetch",
                               daemon=True)
    _thread.start()


def wait() -> None:
    """Wait for the prefetch, if one was started (so the build's imports never race it)."""
    if _thread is not None:
        _thread.join()
