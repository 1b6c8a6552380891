"""Judges: score completions. Each is a small callable ``list[str] -> list[float]``."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence

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
    import httpx

    url = base_url.rstrip("/") + (
        "/chat/completions" if base_url.rstrip("/").endswith("/v1") else "/v1/chat/completions"
    )

    def judge(texts: Sequence[str]) -> list[float]:
        scores = []
        with httpx.Client(timeout=timeout) as client:
            for text in texts:
                prompt = rubric.format(behaviour=behaviour, text=text)
                body = {
                    "model": model,
                    "messages": [{"role": "user", "content": prompt}],
                    "temperature": 0,
                    "max_tokens": 8,
                }
                try:
                    response = client.post(
                        url, json=body, headers={"Authorization": f"Bearer {api_key}"}
                    )
                    response.raise_for_status()
                    reply = response.json()["choices"][0]["message"]["content"]
                except (httpx.HTTPError, KeyError, IndexError, json.JSONDecodeError) as exc:
                    raise SteerlabError(
                        f"the LLM judge at {url} failed ({type(exc).__name__}): check --judge-url and that the server runs"
                    ) from None
                match = re.search(r"-?\d+(\.\d+)?", str(reply))
                scores.append(float(match.group()) / 10.0 if match else float("nan"))
        return scores

    return judge
