"""The vLLM engine's side of the engine seam that evaluation uses: batches of rows with the
unsteered comparison (KL and unsteered log-probabilities from an unsteered twin per row,
:mod:`steerlab.vllm.twins`), next-token log-probabilities and scored continuations. A mixin
of :class:`steerlab.vllm.engine.VllmEngine`, whose loop, engine and registry it uses."""

from __future__ import annotations

import asyncio
import concurrent.futures
import uuid
from collections.abc import Sequence
from typing import Any

import torch

from steerlab.core.decoded import Decoded
from steerlab.core.engine import OnStep
from steerlab.core.errors import SteerlabError
from steerlab.core.sampling import Sampling
from steerlab.core.steering import Steering
from steerlab.vllm.requests import extra_args


class Seam:
    """``decode_batch``, ``next_token_logprobs`` and ``score`` over vLLM requests."""

    engine: Any
    _loop: asyncio.AbstractEventLoop
    _tokenizer: Any

    def entries(self, steerings: Sequence[Steering]) -> list[dict[str, Any]]:
        raise NotImplementedError

    # ----- the engine seam -------------------------------------------------------------------
    async def _generate(
        self, ids: Sequence[int], params: Any, first: asyncio.Event | None = None
    ) -> tuple[list[int], list[float], Any]:
        """One request to its end: its tokens, their log-probabilities (when asked) and its
        last output; ``first`` is set once the first token is out."""
        from vllm import TokensPrompt

        rid = "steerlab-" + uuid.uuid4().hex
        tokens: list[int] = []
        logprobs: list[float] = []
        last = None
        async for out in self.engine.generate(
            TokensPrompt(prompt_token_ids=list(ids)), params, rid
        ):
            completion = out.outputs[0]
            for i, token in enumerate(completion.token_ids):
                tokens.append(int(token))
                if completion.logprobs:
                    logprobs.append(float(completion.logprobs[i][token].logprob))
            if first is not None and tokens:
                first.set()
            last = out
        if first is not None:
            first.set()
        return tokens, logprobs, last

    async def _tracked(
        self,
        ids: Sequence[int],
        entries: list[dict[str, Any]],
        sampling: Sampling,
        seed: int | None,
        key: str,
    ) -> tuple[list[int], list[float], str | None]:
        """A row and ``key``, under which the workers hold its per-step KL(steered ||
        unsteered) and the unsteered log-probability of each of its tokens (None instead: an
        unsteered row, KL 0, with its own log-probabilities): its unsteered twin scores the
        row's tokens in one prefill while the worker compares whole distributions
        (:mod:`steerlab.vllm.twins`)."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        from steerlab.vllm import twins

        if not entries:  # an unsteered row is its own twin: KL 0, its own log-probabilities
            plain = SamplingParams(
                max_tokens=sampling.max_new_tokens,
                temperature=0.0,
                seed=seed,
                ignore_eos=not sampling.stop_at_eos,
                logprobs=0,
                detokenize=False,
                output_kind=RequestOutputKind.DELTA,
            )
            tokens, logprobs, _ = await self._generate(ids, plain)
            return tokens, logprobs, None
        extra: dict[str, Any] = {twins.KEY: {"key": key, "role": "row"}, **extra_args(entries)}
        row = SamplingParams(
            max_tokens=sampling.max_new_tokens,
            temperature=0.0,
            seed=seed,
            ignore_eos=not sampling.stop_at_eos,
            detokenize=False,
            output_kind=RequestOutputKind.DELTA,
            extra_args=extra,
        )
        tokens, _, _ = await self._generate(ids, row)
        if tokens:
            twin = SamplingParams(
                max_tokens=1,
                temperature=0.0,
                detokenize=False,
                extra_args={twins.KEY: {"key": key, "role": "twin", "prompt": len(ids)}},
            )
            await self._generate(list(ids) + tokens, twin)
        return tokens, [], key

    def _fetch_twins(self, keys: list[str]) -> dict[str, tuple[list[float], list[float]]]:
        """What each twin computed in the workers, by row key: per generated token the KL and
        the unsteered log-probability (one call for a batch; forgotten there once read)."""
        if not keys:
            return {}
        call = self.engine.collective_rpc("steerlab_fetch_kl", args=(keys,))
        fetched = asyncio.run_coroutine_threadsafe(call, self._loop).result()
        out: dict[str, tuple[list[float], list[float]]] = {}
        for worker in fetched:  # the workers that hold the last stage answer; others are empty
            out.update({k: (kl, lp) for k, (kl, lp) in worker.items() if kl})
        return out

    def decode_batch(
        self,
        prompts: Sequence[Sequence[int]],
        steering: Sequence[Sequence[Steering]],
        sampling: Sampling,
        *,
        on_step: OnStep | None = None,
        explain: int = 0,
        seeds: Sequence[int | None] | None = None,
        track_unsteered: bool = False,
        share_prompts: bool = False,
    ) -> Decoded:
        """Generate every row as its own vLLM request (continuously batched; vLLM's prefix
        cache shares prompts, so ``share_prompts`` changes nothing here); ``on_step`` sees
        each step's tokens after the batch is done. ``track_unsteered`` gives each row's
        per-step KL and unsteered log-probabilities from an unsteered twin (greedy rows)."""
        if explain:
            raise SteerlabError(
                "per-token KL in the playground needs the Hugging Face engine (steerlab serve "
                "without --engine vllm)"
            )
        if track_unsteered and sampling.temperature > 0:
            raise SteerlabError(
                "KL and perplexity against the unsteered model need greedy rows on the vLLM "
                "engine (its unsteered twin follows the row's argmax): use --engine hf to sample"
            )

        def seed_of(r: int) -> int | None:
            if seeds is not None:
                return seeds[r]
            return None if sampling.seed is None else sampling.seed + r

        futures = []
        keys = []  # steered tracked rows' keys in the workers (twins.py)
        for r, (ids, row) in enumerate(zip(prompts, steering, strict=True)):
            entries = self.entries(row)
            if track_unsteered:
                keys.append(uuid.uuid4().hex)
                coro: Any = self._tracked(ids, entries, sampling, seed_of(r), keys[-1])
            else:
                coro = self._plain(ids, entries, sampling, seed_of(r))
            futures.append(asyncio.run_coroutine_threadsafe(coro, self._loop))
        concurrent.futures.wait(futures)
        # every key leaves the workers, a failed row's stored distributions too
        scored = self._fetch_twins(keys)
        results = [f.result() for f in futures]  # the first failed row's error, if any
        generated = [r[0] for r in results]
        lengths = [len(g) for g in generated]
        eos = self._tokenizer.eos_token_id
        fill = int(eos) if eos is not None else 0
        width = max(max(lengths, default=0), 1)
        tokens = torch.full((len(generated), width), fill, dtype=torch.long)
        kl = torch.zeros(len(generated), width) if track_unsteered else None
        unsteered = torch.zeros(len(generated), width) if track_unsteered else None
        for r, g in enumerate(generated):
            tokens[r, : len(g)] = torch.tensor(g, dtype=torch.long)
            if kl is not None and unsteered is not None:
                key = results[r][2]
                if not isinstance(key, str):  # an unsteered row: KL 0, its own log-probabilities
                    unsteered[r, : len(g)] = torch.tensor(results[r][1])
                    continue
                values, logprobs = scored.get(key, ([], []))
                if len(values) != len(g):
                    raise SteerlabError(
                        f"the unsteered twin gave {len(values)} KL values for {len(g)} tokens"
                    )
                kl[r, : len(g)] = torch.tensor(values)
                unsteered[r, : len(g)] = torch.tensor(logprobs)
        if on_step is not None:
            done = torch.zeros(len(generated), dtype=torch.bool)
            for step in range(width):
                done |= torch.tensor([step >= n for n in lengths])
                if on_step(tokens[:, step], done) is True:
                    break
        return Decoded(tokens=tokens, lengths=lengths, kl=kl, unsteered_logprobs=unsteered)

    async def _plain(
        self,
        ids: Sequence[int],
        entries: list[dict[str, Any]],
        sampling: Sampling,
        seed: int | None,
    ) -> tuple[list[int], list[float], str | None]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(
            max_tokens=sampling.max_new_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            seed=seed,
            ignore_eos=not sampling.stop_at_eos,
            output_kind=RequestOutputKind.DELTA,
            extra_args=extra_args(entries) if entries else None,
        )
        tokens, _, _ = await self._generate(ids, params)
        return tokens, [], None

    def next_token_logprobs(
        self,
        prompts: Sequence[Sequence[int]],
        steering: Sequence[Sequence[Steering]],
        candidates: Sequence[Sequence[int]],
        *,
        batch_size: int = 16,
    ) -> list[list[float]]:
        """Each candidate token's log-probability at the position after each prompt, each
        row with its own steerings (one vLLM request per row, ``logprob_token_ids``)."""
        futures = [
            asyncio.run_coroutine_threadsafe(self._next(ids, self.entries(row), tokens), self._loop)
            for ids, row, tokens in zip(prompts, steering, candidates, strict=True)
        ]
        return [f.result() for f in futures]

    async def _next(
        self, ids: Sequence[int], entries: list[dict[str, Any]], tokens: Sequence[int]
    ) -> list[float]:
        from vllm import SamplingParams

        params = SamplingParams(
            max_tokens=1,
            temperature=0.0,
            logprob_token_ids=[int(t) for t in tokens],
            extra_args=extra_args(entries) if entries else None,
        )
        _, _, out = await self._generate(ids, params)
        step = out.outputs[0].logprobs[0]
        return [float(step[int(t)].logprob) for t in tokens]

    def score(
        self,
        pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
        steering: Sequence[Sequence[Steering]],
        *,
        batch_size: int = 16,
    ) -> list[tuple[float, bool]]:
        """log p(continuation | context) per pair and whether it is greedy, each row with its
        steerings counted from the context (vLLM's prompt log-probabilities; a one-token
        continuation reads the next token's log-probability directly)."""
        futures = [
            asyncio.run_coroutine_threadsafe(self._score(ctx, cont, self.entries(row)), self._loop)
            for (ctx, cont), row in zip(pairs, steering, strict=True)
        ]
        return [f.result() for f in futures]

    async def _score(
        self, ctx: Sequence[int], cont: Sequence[int], entries: list[dict[str, Any]]
    ) -> tuple[float, bool]:
        from vllm import SamplingParams

        from steerlab.vllm.step import PROMPT_LENGTH

        extra = extra_args(entries) if entries else None
        if len(cont) == 1:
            params = SamplingParams(
                max_tokens=1, temperature=0.0, logprob_token_ids=[int(cont[0])], extra_args=extra
            )
            tokens, _, out = await self._generate(ctx, params)
            lp = float(out.outputs[0].logprobs[0][int(cont[0])].logprob)
            return lp, tokens[:1] == [int(cont[0])]
        if extra is not None:
            extra = {**extra, PROMPT_LENGTH: len(ctx)}
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1, extra_args=extra)
        _, _, out = await self._generate(list(ctx) + list(cont), params)
        rows = out.prompt_logprobs[len(ctx) :]
        total = sum(float(row[int(t)].logprob) for row, t in zip(rows, cont, strict=True))
        greedy = all(row[int(t)].rank == 1 for row, t in zip(rows, cont, strict=True))
        return total, greedy
