"""Write src/steerlab/data/sentiment.jsonl: parallel positive/negative sentiment pairs.

The pairs share a prompt and differ only in sentiment-bearing words, so the mean
difference isolates sentiment. Run: python scripts/make_sentiment.py
"""

from __future__ import annotations

import json
from pathlib import Path

TOPICS = [
    "the weather today",
    "my new job",
    "this city",
    "Monday mornings",
    "cooking dinner",
    "the new phone",
    "our neighbours",
    "the train ride",
    "the concert last night",
    "school",
    "the holiday trip",
    "this restaurant",
    "the movie we saw",
    "my apartment",
    "the weekend",
    "the team meeting",
    "learning to code",
    "the garden",
    "the book I am reading",
    "winter",
    "the hotel",
    "my commute",
    "the party",
    "the museum",
    "online shopping",
    "the hospital visit",
    "the football match",
    "the exam results",
    "my birthday",
    "the coffee here",
]
TEMPLATES = [
    (
        "I absolutely love {t}. It always makes me so happy.",
        "I absolutely hate {t}. It always makes me so miserable.",
    ),
    (
        "Honestly, {t} is wonderful and I feel grateful.",
        "Honestly, {t} is awful and I feel bitter.",
    ),
    (
        "What a delightful, joyful experience {t} is!",
        "What a dreadful, depressing experience {t} is!",
    ),
    ("I feel excited and cheerful about {t}.", "I feel anxious and gloomy about {t}."),
    (
        "Everything about {t} is fantastic. I am thrilled.",
        "Everything about {t} is terrible. I am furious.",
    ),
    ("{T} fills me with hope and warmth.", "{T} fills me with dread and despair."),
    (
        "I am so pleased with {t}; it is a real blessing.",
        "I am so disappointed with {t}; it is a real curse.",
    ),
    (
        "Thinking about {t} makes me smile with joy.",
        "Thinking about {t} makes me cry with sadness.",
    ),
    (
        "{T} is brilliant, and I adore every moment of it.",
        "{T} is horrible, and I loathe every moment of it.",
    ),
    (
        "I have nothing but praise and love for {t}.",
        "I have nothing but complaints and contempt for {t}.",
    ),
]


def main() -> None:
    target = Path(__file__).resolve().parents[1] / "src" / "steerlab" / "data" / "sentiment.jsonl"
    rows = []
    for topic in TOPICS:
        for pos, neg in TEMPLATES:
            fill = {"t": topic, "T": topic[0].upper() + topic[1:]}
            rows.append(
                {
                    "prompt": f"How do you feel about {topic}?",
                    "positive": pos.format(**fill),
                    "negative": neg.format(**fill),
                }
            )
    target.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} pairs to {target}")


if __name__ == "__main__":
    main()
