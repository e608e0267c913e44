"""The memory plan's facts and training passes shown in the log, each pass with its layout, peak and times:

    python -m lit_mistral fit --config configs/qlora-fast.yaml ... \\
        --trainer.callbacks+=benchmarks.train.plan_passes.ShowPlanPasses

(run from the repository root, or with it on PYTHONPATH). `fit_plan` logs them at DEBUG, which a run does not show;
a benchmark of the plan shows them so that a choice slower than the best hand-tuned setting can be traced to the
pass that misled it, and replayed without a GPU (`plan.choose` with those facts, peaks and speeds)."""

import logging

import lightning as L

LOGGER = "lit_mistral.modeling.fit_plan"


class ShowPlanPasses(L.Callback):
    def __init__(self) -> None:
        logger = logging.getLogger(LOGGER)
        logger.setLevel(logging.DEBUG)
        if not any(isinstance(h, logging.StreamHandler) and h.level <= logging.DEBUG for h in logger.handlers):
            handler = logging.StreamHandler()  # stderr, beside the plan's line (in order where they are captured)
            handler.setLevel(logging.DEBUG)
            logger.addHandler(handler)
