"""Measuring steering: behaviour probability, judged generation, side effects and KL.

Everything here runs through the engine seam (:class:`steerlab.core.engine.Engine`:
``decode_batch`` with the unsteered comparison, ``score``, ``next_token_logprobs``), so it
runs on any engine with the ``kl`` capability."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from steerlab.core.dataset import Dataset
from steerlab.core.engine import Engine
from steerlab.core.errors import SteerlabError
from steerlab.core.prompts import prompt_ids
from steerlab.core.sampling import Sampling
from steerlab.core.steering import Steering
from steerlab.evaluation.judges import Judge


@dataclass(frozen=True)
class ABResult:
    """p(matching) / (p(matching) + p(not matching)) per item, and its mean."""

    mean: float
    scores: tuple[float, ...]


def behaviour_probability(
    lm: Engine,
    dataset: Dataset,
    steering: Sequence[Steering] = (),
    *,
    batch_size: int = 16,
    chat: bool = True,
    system: str | None = None,
) -> ABResult:
    """The CAA A/B metric (and its Yes/No analogue) under steering.

    A/B items end the prompt with the assistant turn opened by ``(``; the score is
    p(matching letter) / (p(A) + p(B)) at the next token. Yes/No items score
    p(matching answer) / (p(Yes) + p(No)). Every policy applies to the one forward pass
    (``transient`` and ``after-prompt`` both steer the last position there).
    """
    scores = behaviour_probability_cells(
        lm, dataset, [list(steering)], batch_size=batch_size, chat=chat, system=system
    )[0]
    return ABResult(mean=sum(scores) / len(scores), scores=tuple(scores))


def behaviour_probability_cells(
    lm: Engine,
    dataset: Dataset,
    cells: Sequence[Sequence[Steering]],
    *,
    batch_size: int = 16,
    chat: bool = True,
    system: str | None = None,
    max_rows: int = 256,
) -> list[list[float]]:
    """:func:`behaviour_probability`'s per-item scores for several steerings at once.

    Each call of the engine holds one chunk of ``batch_size`` items for several cells (one
    row per cell and item, each row with its own steering), so every row is padded as it
    would be alone with its cell.
    """
    if dataset.format not in ("ab", "yesno"):
        raise SteerlabError(
            f"behaviour probability needs an ab or yesno dataset, not {dataset.format}"
        )
    tok = lm.tokenizer
    prefix = "(" if dataset.format == "ab" else ""

    def first_token(text: str) -> int:
        return int(tok(text, add_special_tokens=False)["input_ids"][0])

    seqs, pairs_ids = [], []
    for p in dataset.pairs:
        seqs.append(
            prompt_ids(tok, p.prompt or "", system=system, assistant_prefix=prefix, chat=chat)
        )
        pos = p.positive.strip("()") if dataset.format == "ab" else p.positive
        neg = p.negative.strip("()") if dataset.format == "ab" else p.negative
        pairs_ids.append((first_token(pos), first_token(neg)))
    scores: list[list[float]] = [[] for _ in cells]
    per_forward = max(1, max_rows // batch_size)  # cells per call
    for begin in range(0, len(seqs), batch_size):
        chunk = seqs[begin : begin + batch_size]
        answers = pairs_ids[begin : begin + batch_size]
        for first in range(0, len(cells), per_forward):
            group = list(range(first, min(first + per_forward, len(cells))))
            lps = lm.next_token_logprobs(
                [s for _ in group for s in chunk],
                [list(cells[c]) for c in group for _ in chunk],
                [list(a) for _ in group for a in answers],
                batch_size=len(group) * len(chunk),
            )
            for g, c in enumerate(group):
                for row in range(len(chunk)):
                    la, lb = lps[g * len(chunk) + row]
                    pa, pb = math.exp(la), math.exp(lb)
                    scores[c].append(pa / (pa + pb) if pa + pb > 0 else 0.5)
    return scores


def distinct_n(texts: Sequence[str], n: int = 2) -> float:
    """Distinct n-grams over all n-grams of the completions (1 = no repetition)."""
    total, unique = 0, set()
    for t in texts:
        words = t.split()
        grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
        total += len(grams)
        unique.update(grams)
    return len(unique) / total if total else 1.0


def text_perplexity(lm: Engine, text: str, steering: Sequence[Steering] = ()) -> float:
    """Perplexity of ``text`` under the (steered) model, every position steered as generated
    text would be (the text is the continuation of its first token)."""
    ids = lm.tokenizer(text)["input_ids"]
    if len(ids) < 2:
        raise SteerlabError("the neutral text needs at least two tokens")
    ((logprob, _),) = lm.score([(ids[:1], ids[1:])], [list(steering)])
    return float(math.exp(-logprob / (len(ids) - 1)))


NEUTRAL_TEXT = (
    "The library opens at nine in the morning and closes at six in the evening. Visitors can "
    "borrow up to five books at a time, and the loan period is three weeks. The reading room "
    "is on the second floor, next to the map collection."
)


@dataclass(frozen=True)
class GenerationScore:
    """Judged generation with its side effects.

    Attributes:
        behaviour: mean judge score of the completions.
        perplexity: perplexity of the completions under the unsteered model.
        distinct2: distinct bigrams / bigrams (repetition).
        kl: mean per-step KL(steered || unsteered) of the next-token distributions.
        neutral_perplexity: the steered model's perplexity on a neutral text.
        texts: the completions.
    """

    behaviour: float
    perplexity: float
    distinct2: float
    kl: float
    neutral_perplexity: float
    texts: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class JudgedRows:
    """Per generated row: the text, its judge score, and the unsteered model's negative
    log-likelihood of its tokens, their number and the summed per-step KL."""

    texts: tuple[str, ...]
    scores: tuple[float, ...]
    nll: tuple[float, ...]
    tokens: tuple[int, ...]
    kl: tuple[float, ...]


def judged_rows(
    lm: Engine,
    prompts: Sequence[str],
    steering: Sequence[Sequence[Steering]],
    judge: Judge,
    sampling: Sampling | None = None,
    *,
    chat: bool = True,
    system: str | None = None,
) -> JudgedRows:
    """Generate one row per prompt, each with its own steering, in one batch, and judge it.

    Rows share their prompts' prefill where the engine can (``share_prompts``), so a cell
    alone and many cells in one batch run the same arithmetic; the unsteered comparison
    (KL, the unsteered log-probabilities behind perplexity) is the engine's.
    """
    sampling = sampling or Sampling(max_new_tokens=32)
    tok = lm.tokenizer
    ids = [prompt_ids(tok, p, system=system, chat=chat) for p in prompts]
    out = lm.decode_batch(
        ids, [list(s) for s in steering], sampling, track_unsteered=True, share_prompts=True
    )
    texts = [
        tok.decode(out.tokens[r, : out.lengths[r]].tolist(), skip_special_tokens=True)
        for r in range(len(prompts))
    ]
    assert out.kl is not None and out.unsteered_logprobs is not None
    nll = tuple(-float(out.unsteered_logprobs[r, :n].sum()) for r, n in enumerate(out.lengths))
    kl = tuple(float(out.kl[r, :n].sum()) for r, n in enumerate(out.lengths))
    scores = (
        judge(texts, list(prompts))  # type: ignore[call-arg]
        if getattr(judge, "takes_prompts", False)
        else judge(texts)
    )
    return JudgedRows(tuple(texts), tuple(scores), nll, tuple(int(n) for n in out.lengths), kl)


def judged_generation(
    lm: Engine,
    prompts: Sequence[str],
    steering: Sequence[Steering],
    judge: Judge,
    sampling: Sampling | None = None,
    *,
    chat: bool = True,
    system: str | None = None,
    neutral_text: str = NEUTRAL_TEXT,
) -> GenerationScore:
    """Generate from ``prompts`` with ``steering`` and score behaviour and side effects."""
    rows = judged_rows(
        lm, prompts, [list(steering)] * len(prompts), judge, sampling, chat=chat, system=system
    )
    return generation_score(rows, text_perplexity(lm, neutral_text, steering))


def generation_score(rows: JudgedRows, neutral_perplexity: float) -> GenerationScore:
    """One cell's :class:`GenerationScore` from its rows."""
    count = max(sum(rows.tokens), 1)
    scores = [s for s in rows.scores if not math.isnan(s)]
    return GenerationScore(
        behaviour=sum(scores) / len(scores) if scores else float("nan"),
        perplexity=math.exp(sum(rows.nll) / count),
        distinct2=distinct_n(rows.texts, 2),
        kl=sum(rows.kl) / count,
        neutral_perplexity=neutral_perplexity,
        texts=rows.texts,
    )
