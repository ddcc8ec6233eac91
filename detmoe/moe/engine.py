"""A small continuous-batching engine over `MoETransformer`, the way a serving stack runs it.

Each step packs every active request into one ragged batch: a request still reading its prompt
contributes its next prefill chunk, a request generating contributes its last token. Requests arrive
at a given step, join the running batch, finish after `max_new_tokens` and free their cache slot.
Greedy decoding by default (temperature 0: the question is why temperature 0 is not deterministic);
a request with temperature > 0 samples from its own generator, seeded per request, as an RL sampler does.

For `track=True` requests the engine keeps, per processed token, the logits and a compact routing
record per layer (`TokenRoutes`), which the attribution reads.

Legend: T = tokens in a step, E = experts, k = top_k, L = layers.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from detmoe.moe.graphs import DecodeGraphs, graphs_by_default
from detmoe.moe.model import MoETransformer, cu_seqlens_of
from detmoe.moe.routing import Routing
from detmoe.moe.generate import check_count, check_prompt, check_sampling, check_seed, sample_next


@dataclass
class TokenRoutes:
    """Routing of one request's tokens, all layers: kept [n, L, E] bool (experts that processed the
    token), preferred [n, L, k] (its own top-k by router probability, whatever was dropped) and margin
    [n, L] (k-th minus (k+1)-th probability)."""
    kept: torch.Tensor
    preferred: torch.Tensor
    margin: torch.Tensor


@dataclass(frozen=True)
class StepRecord:
    """One engine step: its kind (graph or eager, as in StepTimes), the requests in its batch, the tokens
    it processed and its wall time."""
    kind: str
    requests: int
    tokens: int
    seconds: float


@dataclass
class StepTimes:
    """Where a serving run's wall time went, per kind of step: `graph` steps (every request decoding:
    the padded static-buffer step, replayed as a CUDA graph on a GPU), `eager` steps (prefill or mixed,
    or graphs off; the first ones include compiling kernels), and `capture`, the part of graph steps
    spent recording a bucket's graph on its first use (its warm-up compiles kernels too). A step that
    emits a token ends in a host read of it, so its wall time includes its GPU work; one that only
    prefills leaves its GPU work to the next step, also eager. Admitting and freeing requests between
    steps is in neither kind. `steps` keeps every step's own record (`StepRecord`), in order; the totals
    by kind are summed from it."""
    capture_seconds: float = 0.0
    steps: list[StepRecord] = field(default_factory=list)

    def record(self, graphed: bool, requests: int, tokens: int, seconds: float) -> None:
        self.steps.append(StepRecord("graph" if graphed else "eager", requests, tokens, seconds))

    def as_dict(self) -> dict:
        """The totals: steps and seconds by kind, the eager steps' tokens, the graph recording."""
        graph = [r for r in self.steps if r.kind == "graph"]
        eager = [r for r in self.steps if r.kind == "eager"]
        return dict(graph_steps=len(graph), graph_seconds=round(sum(r.seconds for r in graph), 3),
                    eager_steps=len(eager), eager_seconds=round(sum(r.seconds for r in eager), 3),
                    eager_tokens=sum(r.tokens for r in eager), capture_seconds=round(self.capture_seconds, 3))


@dataclass
class Request:
    prompt: list[int]
    max_new_tokens: int
    arrival: int = 0                  # step at which it joins the batch
    order: float = 0.0                # place in the batch among requests active together (lower first)
    chunk: Optional[int] = None       # prefill chunk size (None: whole prompt in one step)
    track: bool = False
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0                     # the request's own sampling generator (temperature > 0)
    # filled in by the engine
    generated: list[int] = field(default_factory=list)
    fed: int = 0                      # tokens already processed
    slot: int = -1
    generator: Optional[torch.Generator] = None
    logits: list[torch.Tensor] = field(default_factory=list)
    route_parts: list[TokenRoutes] = field(default_factory=list)

    def __post_init__(self) -> None:
        # token ids are checked against the vocabulary by Engine.run, where the model is known
        if not isinstance(self.prompt, list):  # prompt + generated must be list concatenation
            raise ValueError(f"prompt must be a non-empty list of int token ids, got {self.prompt!r}")
        check_prompt("prompt", self.prompt)
        check_count("max_new_tokens", self.max_new_tokens, 0)   # 0: nothing to generate, done at once
        check_count("arrival", self.arrival, 0)
        if self.chunk is not None:
            check_count("chunk", self.chunk, 1)
        check_sampling(self.temperature, self.top_p)
        if self.seed is None:
            raise ValueError("seed must be an int, got None")
        check_seed("seed", self.seed)
        self.seed = int(self.seed)

    @property
    def done(self) -> bool:
        return len(self.generated) >= self.max_new_tokens

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.generated

    def next_input(self) -> list[int]:
        if self.fed < len(self.prompt):
            end = len(self.prompt) if self.chunk is None else min(len(self.prompt), self.fed + self.chunk)
            return self.prompt[self.fed:end]
        return [self.generated[-1]]

    def token_logits(self) -> torch.Tensor:
        """[n, V] logits predicting the token after each processed token (tracked requests)."""
        return torch.cat(self.logits)

    def token_routes(self) -> TokenRoutes:
        parts = self.route_parts
        return TokenRoutes(*(torch.cat([getattr(p, f) for p in parts]) for f in ("kept", "preferred", "margin")))


def routes_of_rows(routings: list[Routing], rows: slice, top_k: int) -> TokenRoutes:
    """The compact record of some rows of a step, all layers."""
    kept = torch.stack([r.expert_sets()[rows] for r in routings], 1)
    # a token's own top-k as a sorted set, ties to the lower id as the routers break them
    preferred = torch.stack([torch.sort(r.probs[rows], dim=1, descending=True, stable=True)
                             .indices[:, :top_k].sort(dim=1).values for r in routings], 1)
    margin = torch.stack([r.margins(top_k)[rows] for r in routings], 1)
    return TokenRoutes(kept.cpu(), preferred.cpu(), margin.cpu())


def poisson(rng: random.Random, mean: float) -> int:
    """Arrivals in one engine step, Poisson(mean), by inversion from a seeded generator."""
    if mean < 0:
        raise ValueError(f"mean arrivals per step (load) must be >= 0, got {mean}")
    n, p, u = 0, math.exp(-mean), rng.random()
    cdf = p
    while u > cdf and p > 0:
        n += 1
        p *= mean / n
        cdf += p
    return n


class Engine:
    def __init__(self, model: MoETransformer, n_slots: int, max_len: int, graphs: Optional[bool] = None):
        """graphs: run steps where every request decodes as CUDA graphs padded to a bucket size
        (detmoe/moe/graphs.py; on a CPU the same padded static-buffer step runs eagerly). Default: on for a
        model on a CUDA device whose step can be captured (a dropless, stateless router)."""
        self.model = model
        if graphs is None:
            graphs = graphs_by_default(model)
        # with graphs, one slot more than requests: the padding's (DecodeGraphs' pad_slot, the last)
        self.cache = model.new_cache(n_slots + 1 if graphs else n_slots, max_len)
        self.graphs = DecodeGraphs(model, self.cache) if graphs else None
        self.free_slots = list(range(n_slots))
        self.steps = 0
        self.batch_sizes: list[int] = []  # requests in each step that ran (a record of the load)
        self.times = StepTimes()

    def run(self, requests: list[Request], max_steps: int = 100_000, until_tracked_done: bool = False) -> list[Request]:
        """Serve the requests to completion (or, with until_tracked_done, until every tracked request has
        finished: what the others do afterwards cannot affect it); returns them with `generated` filled."""
        vocab = self.model.cfg.vocab_size
        requests = list(requests)   # a generator would be used up by the checks below
        if len({id(r) for r in requests}) != len(requests):
            raise ValueError("requests must be distinct Request objects: one appears twice (it would be served "
                             "twice into the same record)")
        for i, r in enumerate(requests):   # before any step: a bad request must not stop the others midway
            if not isinstance(r, Request):
                raise ValueError(f"requests[{i}] must be a Request, got {type(r).__name__}")
            check_prompt(f"requests[{i}].prompt", r.prompt, vocab)
            # the last generated token is never fed back, so the cache holds prompt + max_new - 1 tokens
            if len(r.prompt) + r.max_new_tokens - 1 > self.cache.max_len:
                raise ValueError(f"requests[{i}] needs {len(r.prompt) + r.max_new_tokens - 1} cache positions "
                                 f"(prompt + max_new_tokens - 1), more than max_len={self.cache.max_len}")
        pending = sorted((r for r in requests if not r.done), key=lambda r: r.arrival)  # 0 new tokens: done
        active: list[Request] = []
        tracked = [r for r in requests if r.track]
        while pending or active:
            if until_tracked_done and tracked and all(r.done for r in tracked):
                break
            while pending and pending[0].arrival <= self.steps and self.free_slots:
                r = pending.pop(0)
                r.slot = self.free_slots.pop(0)
                active.append(r)
            if active:
                active.sort(key=lambda r: r.order)
                self.batch_sizes.append(len(active))
                self._step(active)
                for r in [r for r in active if r.done]:
                    self.cache.free(r.slot)
                    self.free_slots.append(r.slot)
                    active.remove(r)
            self.steps += 1
            if self.steps > max_steps:
                raise RuntimeError(f"engine did not finish within max_steps={max_steps}")
        return requests

    def _step(self, batch: list[Request]) -> None:
        start = time.perf_counter()
        inputs = [r.next_input() for r in batch]
        # built on the host: the model checks them there (no device sync) and moves them
        tokens, cu = cu_seqlens_of(inputs)
        slots = torch.tensor([r.slot for r in batch])
        graphed = self.graphs is not None and all(r.fed >= len(r.prompt) for r in batch)  # all decode
        if graphed:
            logits, routings = self.graphs.step(tokens, slots), self.graphs.routings
            self.times.capture_seconds = self.graphs.record_seconds
        else:
            logits, routings = self.model(tokens, cu, self.cache, slots)
        cu = cu.tolist()
        for b, r in enumerate(batch):
            rows = slice(cu[b], cu[b + 1])
            r.fed += len(inputs[b])
            if r.track:
                r.logits.append(logits[rows].cpu())
                r.route_parts.append(routes_of_rows(routings, rows, self.model.cfg.moe.top_k))
        # every greedy request's next token from one argmax over their last rows and one transfer (not
        # a sync per request); argmax picks the first maximum, row by row, as it does on a single row
        emitting = [b for b, r in enumerate(batch) if r.fed >= len(r.prompt)]
        greedy = [b for b in emitting if batch[b].temperature == 0.0]
        if greedy:
            last = torch.tensor([cu[b + 1] - 1 for b in greedy], device=logits.device)
            for b, t in zip(greedy, logits[last].argmax(dim=1).tolist()):
                batch[b].generated.append(t)
        for b in emitting:
            if batch[b].temperature != 0.0:
                batch[b].generated.append(self._sample(batch[b], logits[cu[b + 1] - 1]))
        self.times.record(graphed, len(batch), cu[-1], time.perf_counter() - start)

    @staticmethod
    def _sample(r: Request, logits: torch.Tensor) -> int:
        if r.generator is None:
            r.generator = torch.Generator().manual_seed(r.seed)
        return int(sample_next(logits[None], r.temperature, r.top_p, [r.generator])[0])
