"""Known harmless messages of other libraries are filtered where they start; everything else still shows."""

import logging
import warnings

from lit_mistral.quiet import quiet_known_noise


def test_known_harmless_messages_are_dropped_and_others_kept(caplog):
    quiet_known_noise()
    quiet_known_noise()  # twice (each CLI run in one process): one filter
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    assert len(logger.filters) == 1
    with caplog.at_level(logging.WARNING):
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already "
                       "`pip install kernels`", "No module named 'kernels'")
        logger.warning("something else")
    assert [r.getMessage() for r in caplog.records] == ["something else"]
    liger = logging.getLogger("liger_kernel.backends.registry")  # Liger logs these (liger_kernel/backends/registry.py)
    with caplog.at_level(logging.WARNING):
        caplog.clear()
        liger.warning("Backend impl '%s' for op '%s' could not be imported: %s: %s",
                      "liger_kernel.ops.backends._ascend.rope", "rope", "ImportError", "cannot import name 'tanh'")
        liger.warning("a Liger warning that matters")
    assert [r.getMessage() for r in caplog.records] == ["a Liger warning that matters"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_known_noise()  # after simplefilter: its filters come first
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed")
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec) and "
                      "treespec.is_leaf()` instead.", FutureWarning)
        warnings.warn("a warning that matters")
    assert [str(w.message) for w in caught] == ["a warning that matters"]


def test_lightnings_advert_is_dropped_and_its_other_lines_kept(tmp_path):
    from lightning.pytorch import Trainer

    quiet_known_noise()
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")  # where rank_zero_info logs
    logger.addHandler(handler)
    try:
        Trainer(accelerator="cpu", devices=1, default_root_dir=tmp_path, enable_progress_bar=False)
    finally:
        logger.removeHandler(handler)
    assert any(m.startswith("GPU available") for m in seen), seen
    assert not any("litlogger" in m for m in seen), seen
