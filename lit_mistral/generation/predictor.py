"""`Predictor`: answers the prompt batches of `predict` (and of evaluation) with the continuous-batching engine where
it runs the model, else in static batches through transformers' `generate`.

With the engine, the batches are portions of one stream: each batch's prompts join the rows already running, and a
call returns the answers that finished meanwhile (of this batch or earlier ones), so the writer writes rows as they
finish and the rows of a batch never wait for its longest. The last batch drains the stream."""

import logging

import torch
from lightning.pytorch.utilities import rank_zero_info

from lit_mistral.config import Generation
from lit_mistral.generation.batches import context_window, generate, record, row_limits, skipped
from lit_mistral.generation.engine import Engine
from lit_mistral.generation.session import Session

log = logging.getLogger(__name__)


def eos_ids(model, tokenizer) -> set[int]:
    """The tokens that end an answer: the tokenizer's EOS and the model's generation config's (chat models often
    end their turn with another token, e.g. <|eot_id|>)."""
    found = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    found.update(configured if isinstance(configured, list) else [configured])
    return {i for i in found if i is not None}


class Predictor:
    """Answers prompt batches (`data.prompt_batches.collate_prompts`) with `model`.

    Args:
        model: the model to generate with (merged, or a peft model on a 4-bit base), in eval mode.
        tokenizer: its tokenizer.
        settings: the generation settings (`engine`, `max_rows`, `max_cache_tokens`, sampling).
        greedy: answer greedily whatever `settings` say (evaluation), with at most `max_new_tokens` (if given).
        static: use transformers' `generate` in static batches (e.g. a model sharded by FSDP, whose layers the
            engine cannot call directly).
        max_rows: the engine's rows (default: `settings.max_rows`, with its `max_cache_tokens`; given: the cache
            sized for these rows).
        cuda_graphs: whether the engine captures CUDA graphs (default: as `settings` say).
        synced_gpus: static batches on a model sharded over processes: keep stepping until every process is done.
    """

    def __init__(self, model, tokenizer, settings: Generation, greedy: bool = False, max_new_tokens: int | None = None,
                 static: bool = False, max_rows: int | None = None, cuda_graphs: bool | None = None,
                 synced_gpus: bool = False) -> None:
        self.model, self.tokenizer, self.settings = model, tokenizer, settings
        self.sampling = settings.sampling(greedy, max_new_tokens)
        self.context = context_window(model)
        self.eos = eos_ids(model, tokenizer)
        self.cuda_graphs = settings.cuda_graphs if cuda_graphs is None else cuda_graphs
        self.synced_gpus = synced_gpus
        self.max_rows = max_rows or settings.max_rows
        self.max_cache_tokens = None if max_rows else settings.max_cache_tokens
        supported, why = Engine.supports(model)
        self.use_engine = not static and settings.engine != "static" and supported
        if settings.engine == "continuous" and not self.use_engine:
            log.warning("model.generation.engine=continuous: %s; generating in static batches.",
                        why or "the model is sharded")
        self.session: Session | None = None
        self.pending: dict[int, tuple] = {}  # key -> (example, prompt tokens) of prompts in the stream

    def __call__(self, batch: dict, last: bool) -> list[dict]:
        """Records of the prompts answered now: with the engine, those of this batch and earlier ones that
        finished (all, when `last`); else this batch's."""
        if not self.use_engine:
            return generate(self.model, self.tokenizer, batch, context=self.context, cache=self.settings.cache,
                            synced_gpus=self.synced_gpus, **self.sampling)
        limits = row_limits(batch, self.sampling["max_new_tokens"])
        out, rows = [], []  # rows: positions in the batch of the prompts that fit the context
        for row, (key, example, prompt, new) in enumerate(zip(batch["index"], batch["example"], batch["prompts"],
                                                               limits)):
            if self.context is not None and len(prompt) + new > self.context:
                out.append(skipped(key, example, len(prompt), new, self.context))
            else:
                rows.append(row)
        if rows:
            prompts, news = [batch["prompts"][r] for r in rows], [limits[r] for r in rows]
            self._start(prompts, news)
            refused = self.session.engine.problems(prompts, news)  # longer than the cache or the window
            if refused:
                out += self._static(batch, [rows[i] for i in sorted(refused)])
            kept = [i for i in range(len(rows)) if i not in refused]
            for i in kept:
                self.pending[batch["index"][rows[i]]] = (batch["example"][rows[i]], len(prompts[i]))
            self.session.add([prompts[i] for i in kept], [news[i] for i in kept],
                             [batch["index"][rows[i]] for i in kept])
        if self.session is not None:
            for key, answer in self.session.run(starve=0 if last else self.session.engine.refill_rows):
                example, n = self.pending.pop(key)
                text = self.tokenizer.decode(answer.tokens, skip_special_tokens=True).strip()
                out.append(record(key, example, n, text, len(answer.tokens), answer.finish))
            if last:
                rank_zero_info(f"Generation engine: {self.session.describe()}.")
        return out

    def _start(self, prompts: list[list[int]], news: list[int]) -> None:
        """The engine and its stream, at the first batch: as many rows as `max_rows` says, and as many cache
        positions as `max_cache_tokens` says or, unset, as the rows need at the longest prompt + answer of this
        batch (predict plans the longest answer limits first; a later prompt too long for the cache is answered in
        static batches)."""
        if self.session is not None:
            return
        rows = self.max_rows
        positions = self.max_cache_tokens or rows * max(n + new for n, new in zip(map(len, prompts), news))
        engine = Engine(self.model, max_rows=rows, max_tokens=positions, cuda_graphs=self.cuda_graphs)
        do_sample, t, top_p, top_k = (self.sampling[k] for k in ("do_sample", "temperature", "top_p", "top_k"))
        self.session = Session(engine, sorted(self.eos), do_sample, t, top_p, top_k, self.settings.seed)

    def _static(self, batch: dict, rows: list[int]) -> list[dict]:
        """The prompts of `rows` of `batch` through transformers' `generate`."""
        picked = {k: (v[rows] if torch.is_tensor(v) else [v[i] for i in rows]) for k, v in batch.items()}
        width = int(picked["attention_mask"].sum(1).max())
        picked.update(input_ids=picked["input_ids"][:, -width:], attention_mask=picked["attention_mask"][:, -width:])
        return generate(self.model, self.tokenizer, picked, context=self.context, cache=self.settings.cache,
                        **self.sampling)
