"""Two horror-style scores for generated text, one simple and one a reader can trust more.

`horror_lexicon`: dark words per 100 words, as in the original pipeline. Transparent and
cheap, but it counts words, not meaning: "not scary at all" scores the same as "scary".
`horror_classifier`: P(dark) from a TF-IDF + logistic-regression classifier trained on the
training pairs' chosen (dark) vs rejected (wholesome) answers, with its accuracy on the
held-out test pairs reported beside it. It measures closeness to the *training data's* notion
of dark, so it rewards the template's vocabulary and cannot judge quality or fluency.
"""

from __future__ import annotations

import re

HORROR_LEXICON = frozenset(
    """afraid ash blood bone bones breath buried cellar cold corpse creak creaked crept cried dark
    darkness dead death dread drowned dusk eerie empty fear fog frozen ghost grave grey haunted
    hollow horror hum humming knock knocking lost midnight mirror moan never nightmare pale
    patient scream screamed shadow shadows shiver silence silent skeleton still stone strange
    terror trembling unseen vanished wail well whisper whispered whispering wither wrong""".split()
)
SCORE_NOTES = {
    "horror_lexicon": "dark words per 100 words (a fixed lexicon); counts words, not meaning",
    "horror_classifier": "P(dark) from a TF-IDF + logistic-regression model trained on the training "
    "pairs' chosen vs rejected answers; measures likeness to the training data's dark style, "
    "not quality",
}
_WORD = re.compile(r"[a-z']+")


def lexicon_score(text: str) -> float:
    words = _WORD.findall(text.lower())
    if not words:
        return 0.0
    return 100.0 * sum(w in HORROR_LEXICON for w in words) / len(words)


class StyleClassifier:
    """P(dark | text), trained on preference pairs (chosen = 1, rejected = 0)."""

    def __init__(self, seed: int = 0) -> None:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline

        self.model = make_pipeline(
            TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True),
            LogisticRegression(C=1.0, max_iter=1000, random_state=seed),
        )
        self.test_accuracy: float | None = None

    def fit(self, pairs: list[dict]) -> StyleClassifier:
        texts = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
        self.model.fit(texts, [1] * len(pairs) + [0] * len(pairs))
        return self

    def score(self, texts: list[str]) -> list[float]:
        if not texts:
            return []
        return [float(p) for p in self.model.predict_proba(texts)[:, 1]]

    def pair_accuracy(self, pairs: list[dict]) -> float:
        """Share of held-out pairs where the chosen answer scores darker than the rejected one."""
        chosen = self.score([p["chosen"] for p in pairs])
        rejected = self.score([p["rejected"] for p in pairs])
        self.test_accuracy = sum(c > r for c, r in zip(chosen, rejected)) / max(len(pairs), 1)
        return self.test_accuracy
