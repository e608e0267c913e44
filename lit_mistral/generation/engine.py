"""Continuous-batching generation over a paged KV cache, for Llama/Mistral/Qwen2-family causal LMs (plain, merged,
or a peft model over a bitsandbytes 4-bit base).

Written by hand because transformers' `generate` runs static batches (a row that finishes early idles until the
longest one is done) and pays the launch overhead of hundreds of small kernels per step (its speed on a GPU: see
BENCHMARKS.md). Here a finished row leaves at once, a waiting prompt takes its place, and
on CUDA each decoding step of a given batch size is one CUDA graph.

The engine owns attention and the KV cache only; everything else (embeddings, norms, the q/k/v/o projections, the
MLP, the final norm, lm_head, the rotary embedding and the family's `apply_rotary_pos_emb`) is the model's own
module, called as the model calls it, so merged, 4-bit and LoRA-wrapped layers work unchanged."""

import contextlib
import logging
import sys
from collections.abc import Callable, Sequence

import torch

from lit_mistral.errors import LitMistralError
from lit_mistral.generation.paged_attention import (
    has_triton,
    paged_decode_attention,
    prefill_attention,
    prefill_bounds,
)
from lit_mistral.generation.session import Answer, Session, _Row

log = logging.getLogger(__name__)

FAMILIES = ("llama", "mistral", "qwen2")  # decoder layers that are exactly norm -> attention -> norm -> MLP
_GROWING_ROPE = ("dynamic", "longrope")  # recompute their frequencies from the sequence length at run time


def _causal_lm(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft model: its wrapped base


def _sliding_window(config) -> int | None:
    """The attention window some layer uses (Mistral: all), or None when every layer sees the whole row."""
    layer_types = getattr(config, "layer_types", None) or ["sliding_attention"]
    return getattr(config, "sliding_window", None) if "sliding_attention" in layer_types else None


def _buckets(max_rows: int) -> list[int]:
    """Batch sizes that get a CUDA graph: powers of two up to 64, then steps of 32 (a few padded rows at most)."""
    sizes = [b for b in (1, 2, 4, 8, 16, 32, 64) if b < max_rows]
    sizes += list(range(96, max_rows, 32))
    return sizes + [max_rows]


class Engine:
    """Generates answers for many prompts with continuous batching over a paged KV cache.

    Args:
        model: a transformers causal LM of the Llama/Mistral/Qwen2 family, or a peft model over one (LoRA on a 4-bit
            base included), in eval mode. `Engine.supports(model)` says whether it can run it.
        max_rows: rows decoded together at most (the batch size of a decoding step).
        max_tokens: KV-cache positions for all rows together (rounded up to whole blocks); a row holds its prompt
            + max_new_tokens from its start to its end, so this bounds how many rows run at once as well.
        block_size: cache positions per block (a row's last block is partly unused).
        cuda_graphs: on CUDA, capture one CUDA graph per batch-size bucket for the decoding step.
        prefill_tokens: prompt tokens prefilled together at most (a longer prompt goes alone).
        refill_rows: free rows that trigger prefilling waiting prompts while rows are running (default
            max_rows // 8): fewer, larger prefills, each of which reads the weights once.
    """

    def __init__(self, model, *, max_rows: int, max_tokens: int, block_size: int = 16, cuda_graphs: bool = True,
                 prefill_tokens: int = 8192, refill_rows: int | None = None) -> None:
        ok, reason = self.supports(model)
        if not ok:
            raise LitMistralError(f"the generation engine cannot run this model: {reason}. Fix: generate with "
                                  "transformers' generate instead.")
        if min(max_rows, max_tokens, block_size, prefill_tokens) < 1:
            raise LitMistralError(f"Engine: max_rows={max_rows}, max_tokens={max_tokens}, block_size={block_size}, "
                                  f"prefill_tokens={prefill_tokens}. Fix: each at least 1.")
        lm = _causal_lm(model)
        self.model, self.decoder, self.lm_head = model, lm.model, lm.lm_head
        attn = self.decoder.layers[0].self_attn
        self.apply_rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb  # the family's own
        self.head_dim, self.scale = attn.head_dim, attn.scaling
        self.kv_heads, self.window = lm.config.num_key_value_heads, _sliding_window(lm.config)
        self.device = self.decoder.embed_tokens.weight.device
        self.max_rows, self.block_size = max_rows, block_size
        self.prefill_tokens, self.refill_rows = prefill_tokens, refill_rows or max(1, max_rows // 8)
        self.num_blocks = -(-max_tokens // block_size) + 1  # block 0: scratch, where padding rows write
        # one table line per row slot, plus one for padding rows (all zeros: the scratch block)
        self.tables = torch.zeros(max_rows + 1, self.num_blocks - 1, dtype=torch.int32, device=self.device)
        self.inputs = torch.zeros(3, max_rows, dtype=torch.long, device=self.device)  # tokens, positions, slots
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # bucket -> (graph, its logits)
        self.graph_pool = None
        self.k_cache, self.v_cache = [], []  # per layer: (slots, H_kv, D), allocated by generate
        self.dtype, self.precision = None, None  # cache dtype; (it, autocast dtype or None) the graphs were made under
        self.max_len = 0  # longest row of the current step: bounds the blocks the CPU attention gathers

    @staticmethod
    def supports(model) -> tuple[bool, str]:
        """(True, "") when the engine can run `model`, else (False, why), for the caller to fall back to
        transformers' `generate`."""
        lm = _causal_lm(model)
        config = getattr(lm, "config", None)
        if getattr(config, "model_type", None) not in FAMILIES:
            return False, f"model_type {getattr(config, 'model_type', None)!r} is none of {', '.join(FAMILIES)}"
        capped = [k for k in ("final_logit_softcapping", "attn_logit_softcapping", "logit_scale")
                  if getattr(config, k, None)]
        if capped:
            return False, f"{capped[0]}={getattr(config, capped[0])}: soft-capped or scaled logits"
        decoder = getattr(lm, "model", None)
        if not all(hasattr(decoder, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")) or (
                not hasattr(lm, "lm_head")):
            return False, "the model lacks model.{embed_tokens,layers,norm,rotary_emb} or lm_head"
        for i, layer in enumerate(decoder.layers):
            attn = getattr(layer, "self_attn", None)
            if not all(hasattr(attn, f"{p}_proj") for p in "qkvo") or not all(
                    hasattr(layer, p) for p in ("input_layernorm", "post_attention_layernorm", "mlp")):
                return False, f"layer {i} is not laid out as self_attn.{{q,k,v,o}}_proj, norms and mlp"
            if any(hasattr(attn, extra) for extra in ("q_norm", "k_norm", "sinks")):
                return False, f"layer {i} has query/key norms or attention sinks"
        rope = getattr(decoder.rotary_emb, "rope_type", "default")
        if rope in _GROWING_ROPE:
            return False, f"rope_type {rope!r} changes its frequencies with the sequence length"
        if len({p.device for p in lm.parameters()}) > 1:
            return False, "the model is spread over several devices"
        if decoder.embed_tokens.weight.device.type == "cuda" and not has_triton():
            return False, "decoding attention on CUDA needs triton (pip install triton)"
        return True, ""

    # ---- the model's forward, with our attention and cache ----

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, write: torch.Tensor, attend: Callable):
        """ids/positions (B, T); write (B*T,) the cache slot of each token; attend(layer, q, k, v) with (B*T, heads,
        D) tensors gives (B*T, H, D). Returns the final-norm hidden states (B, T, hidden)."""
        x = self.decoder.embed_tokens(ids)
        cos, sin = self.decoder.rotary_emb(x, position_ids=positions)  # as the model calls it: on the embeddings
        for i, layer in enumerate(self.decoder.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            shape = (*h.shape[:-1], -1, self.head_dim)
            q, k, v = (proj(h).view(shape).transpose(1, 2) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
            q, k = self.apply_rope(q, k, cos, sin)  # (B, heads, T, D)
            q, k, v = (t.transpose(1, 2).reshape(-1, t.shape[1], self.head_dim).to(self.dtype) for t in (q, k, v))
            self.k_cache[i].index_copy_(0, write, k)
            self.v_cache[i].index_copy_(0, write, v)
            out = attend(i, q, k, v)  # (B*T, H, D)
            x = x + attn.o_proj(out.reshape(*h.shape[:-1], -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.decoder.norm(x)

    def _slots(self, row_slots: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        blocks = self.tables[row_slots, positions // self.block_size].long()
        return blocks * self.block_size + positions % self.block_size

    def _decode_forward(self, b: int) -> torch.Tensor:
        """One decoding step over the first b lines of `inputs` (capturable: no host reads). Returns (b, V) logits."""
        tokens, positions, row_slots = self.inputs[:, :b]
        lengths = positions + 1  # the fed token attends to itself

        def attend(i, q, k, v):
            return paged_decode_attention(q, self.k_cache[i], self.v_cache[i], self.tables, row_slots, lengths,
                                          self.block_size, self.scale, self.max_len)

        hidden = self._forward(tokens[:, None], positions[:, None], self._slots(row_slots, positions), attend)
        return self.lm_head(hidden[:, -1]).float()

    def _prefill(self, rows: list[_Row]) -> torch.Tensor:
        """The prompts of `rows` packed in one row, each attending within itself. Returns (len(rows), V) logits of
        their last tokens."""
        lengths = [len(r.prompt) for r in rows]
        table = torch.nn.utils.rnn.pad_sequence([torch.tensor(r.blocks, dtype=torch.int32) for r in rows], True)
        slots = torch.tensor([r.slot for r in rows], device=self.device)
        self.tables[slots, :table.shape[1]] = table.to(self.device)
        ids = torch.tensor([t for r in rows for t in r.prompt], device=self.device)
        positions = torch.cat([torch.arange(n) for n in lengths]).to(self.device)
        bounds = prefill_bounds(lengths, self.device)  # (0, l1, l1+l2, ...): also each prompt's length and end
        write = self._slots(slots.repeat_interleave(bounds.diff().long()), positions)
        hidden = self._forward(ids[None], positions[None], write,
                               lambda i, q, k, v: prefill_attention(q, k, v, lengths, self.scale, bounds))
        return self.lm_head(hidden[0, bounds[1:].long() - 1]).float()

    def _decode(self, rows: list[_Row]) -> torch.Tensor:
        n = len(rows)
        # on CUDA, eager steps too are padded to the bucket: the same shapes, so the same kernels and numbers
        b = next(s for s in _buckets(self.max_rows) if s >= n) if self.device.type == "cuda" else n
        host = torch.zeros(3, b, dtype=torch.long)
        host[2, n:] = self.max_rows  # padding rows: token 0 at position 0 of the scratch block
        host[:, :n] = torch.tensor([[r.tokens[-1] for r in rows], [r.position for r in rows], [r.slot for r in rows]])
        self.inputs[:, :b].copy_(host, non_blocking=True)
        self.max_len = max(r.position for r in rows) + 1
        if self.cuda_graphs and (b in self.graphs or self._capture(b)):
            graph, logits = self.graphs[b]
            graph.replay()
            return logits[:n]
        return self._decode_forward(b)[:n]

    def _capture(self, b: int) -> bool:
        """Capture the decoding step for batch size b (the inputs hold a real step; it is run eagerly once, which
        also compiles the Triton kernel). On failure: say so once and decode eagerly from now on."""
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self._decode_forward(b)  # warm-up: kernels compile, libraries allocate their workspaces
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.graph_pool):
                logits = self._decode_forward(b)
        except Exception as err:  # e.g. a layer that synchronizes with the host
            log.warning("CUDA graph capture failed (%s: %s); decoding eagerly.", type(err).__name__, err)
            with contextlib.suppress(Exception):
                torch.cuda.synchronize()
            self.cuda_graphs = False
            return False
        self.graphs[b] = (graph, logits)
        return True

    def _prepare(self):
        """Allocate the cache pools in the compute dtype (the caller's autocast dtype, else the embeddings'), and
        return the caller's autocast (Lightning's bf16-mixed) again with its weight-cast cache off: a cast cached
        while capturing a graph would be freed with the cache, under the graph's feet."""
        kind = self.device.type
        autocast = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None
        dtype = autocast or self.decoder.embed_tokens.weight.dtype
        if (dtype, autocast) != self.precision:
            self.graphs = {}  # captured with the old pools or under another autocast
        if dtype != self.dtype:
            shape = (self.num_blocks * self.block_size, self.kv_heads, self.head_dim)
            self.k_cache = self.v_cache = []  # free the old pools first
            self.k_cache = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in self.decoder.layers]
            self.v_cache = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in self.decoder.layers]
        self.dtype, self.precision = dtype, (dtype, autocast)
        if self.device.type == "cuda" and self.graph_pool is None:
            self.graph_pool = torch.cuda.graph_pool_handle()
        return torch.autocast(kind, dtype=autocast, cache_enabled=False) if autocast else contextlib.nullcontext()

    # ---- scheduling ----

    def _blocks_needed(self, prompt_len: int, max_new: int) -> int:
        return -(-(prompt_len + max_new - 1) // self.block_size)  # the last new token is never fed back

    def problems(self, prompts: Sequence[Sequence[int]], max_new_tokens: Sequence[int]) -> dict[int, str]:
        """{index: why} for the prompts `generate` would refuse (a caller may send those to transformers' generate
        and the rest here)."""
        vocab = self.decoder.embed_tokens.weight.shape[0]
        found = {}
        for i, (prompt, new) in enumerate(zip(prompts, max_new_tokens)):
            if not prompt or new < 1:
                found[i] = f"{len(prompt)} tokens, max_new_tokens={new} (need at least 1 of each)"
            elif min(prompt) < 0 or max(prompt) >= vocab:
                found[i] = f"token ids outside the vocabulary (0 .. {vocab - 1})"
            elif self._blocks_needed(len(prompt), new) > self.num_blocks - 1:
                found[i] = (f"{len(prompt)} tokens + max_new_tokens={new} do not fit max_tokens="
                            f"{(self.num_blocks - 1) * self.block_size}")
            elif self.window is not None and len(prompt) + new - 1 > self.window:
                found[i] = (f"{len(prompt)} tokens + max_new_tokens={new} exceed the sliding window of "
                            f"{self.window} positions, which the engine does not apply")
        return found

    def _check(self, prompts, max_new_tokens) -> None:
        if len(prompts) != len(max_new_tokens) or self.model.training:
            raise LitMistralError(f"Engine.generate: {len(prompts)} prompts, {len(max_new_tokens)} max_new_tokens, "
                                  f"model in {'training' if self.model.training else 'eval'} mode. Fix: one "
                                  "max_new_tokens per prompt, and model.eval() (dropout would change the answers).")
        found = self.problems(prompts, max_new_tokens)
        if found:
            shown = "".join(f"\n  prompt {i}: {why}" for i, why in list(found.items())[:20])
            raise LitMistralError(f"Engine.generate: {len(found)} prompts it cannot run (the first 20):{shown}\nFix: "
                                  "shorten them or lower max_new_tokens, raise max_tokens, or generate those with "
                                  "transformers' generate (Engine.problems lists them).")

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: Sequence[int], *,
                 eos_token_ids: int | Sequence[int] | None = None, do_sample: bool = False, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, seed: int = 0,
                 on_finish: Callable[[int, Answer], None] | None = None) -> list[Answer]:
        """Answer every prompt (token ids, no padding) with up to its own max_new_tokens, greedy or sampled.
        `on_finish(index, answer)` is called as each prompt finishes (in finishing order); the answers are returned
        in input order. Same prompts, settings and seed on the same machine give the same answers."""
        session = Session(self, eos_token_ids, do_sample, temperature, top_p, top_k, seed)
        session.add(prompts, max_new_tokens, range(len(prompts)))  # checks them
        answers = dict(session.run(on_finish=on_finish))
        return [answers[i] for i in range(len(prompts))]
