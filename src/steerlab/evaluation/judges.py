"""Judges: score completions. Each is a small callable ``list[str] -> list[float]``."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from steerlab.core.errors import SteerlabError

Judge = Callable[[Sequence[str]], list[float]]


def sentiment() -> Judge:
    """VADER's compound sentiment in [-1, 1] (positive = positive sentiment)."""
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError:
        raise SteerlabError(
            "the sentiment judge needs vadersentiment: pip install 'steerlab[eval]'"
        ) from None
    analyzer = SentimentIntensityAnalyzer()

    def judge(texts: Sequence[str]) -> list[float]:
        return [float(analyzer.polarity_scores(t)["compound"]) for t in texts]

    return judge


def keywords(words: Sequence[str]) -> Judge:
    """Occurrences of the given words per 100 words of completion (case-insensitive).

    Raises:
        SteerlabError: an empty word list.
    """
    cleaned = [w.strip().lower() for w in words if w.strip()]
    if not cleaned:
        raise SteerlabError("the keyword judge needs at least one word, e.g. --keywords ocean,sea")
    pattern = re.compile(r"\b(" + "|".join(re.escape(w) for w in cleaned) + r")\w*", re.IGNORECASE)

    def judge(texts: Sequence[str]) -> list[float]:
        scores = []
        for t in texts:
            n = max(len(t.split()), 1)
            scores.append(100.0 * len(pattern.findall(t)) / n)
        return scores

    return judge


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


# Register markers for the casual judge: a small hand-written lexicon (steerlab's own).
CASUAL_WORDS = _words(
    "hey yeah yep yup nope gonna wanna gotta kinda sorta lol haha dude cool awesome super "
    "totally stuff folks okay ok chill tons grab wow oh btw tbh legit buddies buddy guys "
    "basically honestly literally pretty dunno ya cuz 'cause boom sorted hang hit"
)
FORMAL_WORDS = _words(
    "therefore furthermore moreover however consequently regarding additionally thus hence "
    "whereas nevertheless accordingly shall hereby kindly ensure utilize utilise facilitate "
    "individuals approximately subsequently numerous sufficient obtain require assist "
    "commence inquire appropriate significant considerable certainly provide regard"
)
_CONTRACTION = re.compile(r"\b\w+(n't|'re|'ll|'m|'ve|'d)\b|\b(it|that|there|what|he|she)'s\b", re.I)


def casual() -> Judge:
    """Casual register: (casual markers - formal markers) per 100 words of completion.

    Casual markers are contractions, exclamation marks and words of :data:`CASUAL_WORDS`;
    formal markers are words of :data:`FORMAL_WORDS`. A lexicon heuristic (higher = more
    casual), cheap and deterministic, for sweeps and frontiers on the casual-register set.
    """

    def judge(texts: Sequence[str]) -> list[float]:
        scores = []
        for t in texts:
            words = [w.strip('.,;:!?"()').lower() for w in t.split()]
            hits = sum(w in CASUAL_WORDS for w in words) + t.count("!")
            hits += len(_CONTRACTION.findall(t))
            hits -= sum(w in FORMAL_WORDS for w in words)
            scores.append(100.0 * hits / max(len(words), 1))
        return scores

    return judge


DEFAULT_RUBRIC = (
    "Rate how strongly the following text shows the behaviour '{behaviour}' on a scale from "
    "0 (not at all) to 10 (extremely). Answer with the number only.\n\nText:\n{text}"
)


def llm(
    base_url: str,
    model: str,
    behaviour: str,
    *,
    rubric: str = DEFAULT_RUBRIC,
    api_key: str = "none",
    timeout: float = 60.0,
) -> Judge:
    """An LLM judge behind any OpenAI-compatible ``/v1/chat/completions`` endpoint.

    Scores are the first number in the judge's reply, divided by 10 (so in [0, 1]); a
    reply without a number scores NaN and is left out of means.
    """
    url = _chat_url(base_url)

    def judge(texts: Sequence[str]) -> list[float]:
        import httpx

        scores = []
        with httpx.Client(timeout=timeout) as client:
            for text in texts:
                reply = _ask(
                    client, url, model, api_key, rubric.format(behaviour=behaviour, text=text)
                )
                match = re.search(r"-?\d+(\.\d+)?", reply)
                scores.append(float(match.group()) / 10.0 if match else float("nan"))
        return scores

    return judge


def _chat_url(base_url: str) -> str:
    base = base_url.rstrip("/")
    return base + ("/chat/completions" if base.endswith("/v1") else "/v1/chat/completions")


def _ask(client: Any, url: str, model: str, api_key: str, prompt: str) -> str:
    """One greedy, short chat completion from an OpenAI-compatible judge."""
    import httpx

    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "temperature": 0,
        "max_tokens": 8,
    }
    try:
        response = client.post(url, json=body, headers={"Authorization": f"Bearer {api_key}"})
        response.raise_for_status()
        return str(response.json()["choices"][0]["message"]["content"])
    except (httpx.HTTPError, KeyError, IndexError, json.JSONDecodeError) as exc:
        raise SteerlabError(
            f"the LLM judge at {url} failed ({type(exc).__name__}): check --judge-url and that "
            "the server runs"
        ) from None


# AxBench-style ratings (Wu et al. 2025), each 0-2; these templates are steerlab's own.
AXBENCH_TEMPLATES = {
    "concept": (
        "Does the response below express the concept '{concept}'? Answer 0 if it does not "
        "appear, 1 if it appears weakly or only in passing, 2 if it is clearly and strongly "
        "present. Answer with the digit only.\n\nResponse:\n{text}"
    ),
    "instruction": (
        "Is the response below relevant to the instruction? Answer 0 if it ignores it, 1 if "
        "it is partly relevant, 2 if it addresses it. Answer with the digit only.\n\n"
        "Instruction:\n{prompt}\n\nResponse:\n{text}"
    ),
    "fluency": (
        "How fluent and coherent is the response below, as English text? Answer 0 for "
        "broken or repetitive text, 1 for understandable but awkward text, 2 for fluent "
        "text. Answer with the digit only.\n\nResponse:\n{text}"
    ),
}


class PromptJudge:
    """A judge that also reads the prompt of each completion: ``judge(texts, prompts)``."""

    takes_prompts = True

    def __call__(self, texts: Sequence[str], prompts: Sequence[str] = ()) -> list[float]:
        raise NotImplementedError


def axbench(
    base_url: str, model: str, concept: str, *, api_key: str = "none", timeout: float = 60.0
) -> PromptJudge:
    """AxBench's judged score: an LLM judge rates concept presence, relevance to the
    instruction and fluency 0-2 each; the score is their harmonic mean (0 if any rating is
    0), in [0, 2]. A reply without a digit 0-2 scores NaN (left out of means)."""
    url = _chat_url(base_url)

    class AxBench(PromptJudge):
        def __call__(self, texts: Sequence[str], prompts: Sequence[str] = ()) -> list[float]:
            import httpx

            if len(prompts) != len(texts):
                raise SteerlabError("the AxBench judge needs each completion's prompt")
            scores = []
            with httpx.Client(timeout=timeout) as client:
                for text, prompt in zip(texts, prompts, strict=True):
                    ratings = []
                    for template in AXBENCH_TEMPLATES.values():
                        reply = _ask(
                            client, url, model, api_key,
                            template.format(concept=concept, prompt=prompt, text=text),
                        )  # fmt: skip
                        match = re.search(r"[0-2]", reply)
                        ratings.append(float(match.group()) if match else float("nan"))
                    scores.append(harmonic(ratings))
            return scores

    return AxBench()


def harmonic(ratings: Sequence[float]) -> float:
    """The harmonic mean of the ratings; 0 if any is 0, NaN if any is NaN."""
    if any(r != r for r in ratings):
        return float("nan")
    if any(r == 0 for r in ratings):
        return 0.0
    return len(ratings) / sum(1.0 / r for r in ratings)


@dataclass(frozen=True)
class JudgeEntry:
    """A judge by name: a line of help, and how to make it from the command's options
    (``url``, ``model`` and ``behaviour`` for the judges behind an OpenAI-compatible API)."""

    summary: str
    make: Callable[[str | None, str, str], Judge]
    needs_url: bool = False


def _url(name: str, url: str | None) -> str:
    if not url:
        raise SteerlabError(f"--judge {name} needs --judge-url, e.g. http://127.0.0.1:8000/v1")
    return url


JUDGES: dict[str, JudgeEntry] = {
    "sentiment": JudgeEntry("VADER sentiment, -1..1", lambda url, model, behaviour: sentiment()),
    "casual": JudgeEntry(
        "casual minus formal register markers per 100 words", lambda url, model, b: casual()
    ),
    "llm": JudgeEntry(
        "an LLM rates the behaviour 0-10 (needs --judge-url)",
        lambda url, model, behaviour: llm(_url("llm", url), model, behaviour),
        needs_url=True,
    ),
    "axbench": JudgeEntry(
        "AxBench: concept, relevance and fluency 0-2, harmonic mean (needs --judge-url)",
        lambda url, model, behaviour: axbench(_url("axbench", url), model, behaviour),
        needs_url=True,
    ),
}


def judge_help() -> str:
    """The ``--judge`` help text, from the registry (``--keywords`` is the keyword judge)."""
    return "; ".join(f"{name}: {e.summary}" for name, e in JUDGES.items()) + (
        "; or --keywords word1,word2 (occurrences per 100 words)"
    )


def make_judge(name: str, words: str | None, url: str | None, model: str, behaviour: str) -> Judge:
    """The judge a command's options name (``words``: the keyword judge).

    Raises:
        SteerlabError: an unknown judge, or one that needs ``--judge-url`` without it.
    """
    if words:
        return keywords(words.split(","))
    entry = JUDGES.get(name)
    if entry is None:
        raise SteerlabError(
            f"unknown judge '{name}': use {', '.join(JUDGES)}, or --keywords word1,word2"
        )
    return entry.make(url, model, behaviour)
