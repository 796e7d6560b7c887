"""The built-in demo task: an offline analogue of the DPO paper's IMDb sentiment experiment.

Rafailov et al. (2023), section 6.1: GPT-2 is fine-tuned on IMDb reviews (SFT), four completions are sampled
per review prefix, pairs are labelled by a sentiment classifier, DPO is trained on them, and the policy is
evaluated by sentiment reward against KL to the SFT model. Nothing of that may be downloaded here, so:

- the reviews come from a generator whose sentiment words are drawn from VADER's own lexicon, mixed with the
  negations and boosters VADER understands, so that VADER scores them meaningfully;
- the "classifier" is VADER's compound score, used as the reward, to label pairs, and (in `judge.py`) as the
  pairwise judge.

The generator aims each review at a target compound drawn uniformly from [-1, 1]: clauses of both
polarities are mixed and candidates are drawn until one lands near the target. Without that aim, sums of several strong
words saturate VADER's compound and the scores pile up near -1 and +1, which leaves a reward with little
room to improve and pairs that are mostly trivial.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Sequence
from typing import Any

import numpy as np

# ---------------------------------------------------------------------------------------------------------
# Vocabulary. Candidate words are common English words that fit the templates below; only those VADER rates
# with the intended sign and a moderate-to-strong valence survive (`_vocabulary`), so the lexicon decides.
# ---------------------------------------------------------------------------------------------------------

# Adjectives that read after "was": "the script was ___".
_POSITIVE_ADJECTIVES = """
admirable adorable amazing amusing astounding attractive awesome beautiful breathtaking
brilliant charming cheerful classy clever comforting confident convincing courageous creative delightful
dynamic elegant encouraging energetic enjoyable entertaining enthusiastic excellent exciting
exhilarating fabulous fantastic fascinating faultless flawless fun funny glamorous glorious good
gorgeous graceful gracious great harmonious heartfelt heartwarming heroic hilarious honest humorous ideal
impressive innovative inspirational inspiring intelligent interesting invigorating jolly joyful joyous
likeable lively lovable lovely magnificent marvelous nice outstanding passionate perfect playful pleasant
pleasing pleasurable powerful praiseworthy precious pretty promising radiant rapturous reassuring remarkable
respectable rewarding romantic satisfying sincere smart sophisticated special splendid stimulating strong
stunning successful superb sweet sympathetic talented terrific thoughtful thrilling triumphant valuable
vibrant visionary vivacious wonderful worthy
"""
_NEGATIVE_ADJECTIVES = """
abhorrent annoying appalling awful bad boring broken careless chaotic charmless cheerless clueless
contemptible crappy crude defective depressing dire disappointing disastrous disgusting dismal dreadful
dull dumb embarrassing fake flawed frustrating hateful hopeless horrendous horrible horrific idiotic
incompetent inferior insipid insulting irritating joyless lame lamentable lazy lousy ludicrous meaningless
messy mindless miserable moronic nasty obnoxious offensive painful pathetic pitiful poor regrettable
ridiculous rotten sad shameful sickening sluggish stupid sucky talentless terrible tired ugly unacceptable
unattractive uncomfortable undesirable unpleasant unsatisfying useless vile woeful worthless
"""
# Adverbs that read before a participle: "the script was ___ written".
_POSITIVE_ADVERBS = """
beautifully brilliantly charmingly cleverly convincingly creatively delightfully effectively elegantly
gorgeously gracefully impressively intelligently magnificently nicely perfectly splendidly thoughtfully
wonderfully
"""
_NEGATIVE_ADVERBS = """
awkwardly badly disappointingly dreadfully embarrassingly foolishly frustratingly horribly irritatingly
lamely miserably painfully pathetically shamefully stupidly terribly uselessly weakly
"""
# Past-tense verbs that read "I ___ the ending".
_POSITIVE_VERBS = "admired adored appreciated cherished enjoyed liked loved praised treasured"
_NEGATIVE_VERBS = "despised disliked hated loathed regretted resented"

# Moderate-to-strong valence only: weak words (e.g. "fine", 0.8) barely move the compound and blur the task.
_MIN_ABS_VALENCE = 1.2

# Modifiers VADER understands (vaderSentiment.NEGATE, BOOSTER_DICT). "" is the bare word; a negation flips
# the clause (VADER scales it by -0.74), a booster strengthens it, a dampener weakens it.
_ADJECTIVE_MODIFIERS = (
    "",
    "",
    "",
    "very",
    "really",
    "extremely",
    "quite",
    "totally",
    "incredibly",
    "slightly",
    "somewhat",
    "not",
    "not very",
    "never",
)
_VERB_MODIFIERS = ("", "", "", "really", "absolutely", "truly", "never", "deeply")

# Neutral openings: every word here scores 0 under VADER (checked in the tests), so any prefix of up to four
# words is a neutral prompt, as IMDb prefixes are in the paper.
_DETERMINERS = ("This", "The", "That")
_DESCRIPTORS = (
    "new",
    "old",
    "French",
    "Korean",
    "short",
    "latest",
    "recent",
    "indie",
    "animated",
    "silent",
    "British",
    "Italian",
    "quiet",
    "modern",
    "Japanese",
    "Spanish",
    "local",
    "long",
)
_GENRES = (
    "movie",
    "film",
    "picture",
    "drama",
    "western",
    "documentary",
    "musical",
    "sequel",
    "remake",
    "mystery",
    "biopic",
    "cartoon",
)
_COPULAS = ("was", "is", "felt", "seemed")
_PAST_COPULAS = ("was", "felt", "seemed")
# Subjects of later clauses, each with a participle that fits it ("the score was ... composed").
_ASPECTS = (
    ("acting", "done"),
    ("plot", "built"),
    ("script", "written"),
    ("dialogue", "written"),
    ("cast", "chosen"),
    ("score", "composed"),
    ("soundtrack", "mixed"),
    ("ending", "handled"),
    ("pacing", "handled"),
    ("editing", "done"),
    ("camera work", "done"),
    ("lead role", "acted"),
    ("story", "told"),
    ("direction", "done"),
    ("costume design", "done"),
    ("photography", "lit"),
    ("final act", "staged"),
    ("opening scene", "shot"),
    ("music", "arranged"),
    ("set design", "made"),
)
_CONNECTORS = (", and the", ", but the", ". The", "; the", ", although the", ", while the", ". Also the")
_CLOSINGS = ("Overall it was", "In the end it was", "All in all it was")

# Review length bounds (words), roughly those of a short IMDb snippet the tiny model can hold.
_MIN_WORDS = 12
_MAX_WORDS = 30
# Aiming at a target compound: a candidate within `_TARGET_TOLERANCE` is kept at once, else the closest of
# `_MAX_CANDIDATES`. The tolerance sets how uniform the spread is; the cap bounds the cost (a VADER call is
# ~0.2 ms) for targets near +-1 that no review reaches exactly.
_TARGET_TOLERANCE = 0.1
_MAX_CANDIDATES = 40


@functools.lru_cache(maxsize=1)
def _analyzer() -> Any:
    """The VADER analyzer, built once: loading its lexicon takes tens of milliseconds."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def _filter_words(words: str, *, sign: int) -> tuple[str, ...]:
    """Keep the words VADER rates with `sign` and at least `_MIN_ABS_VALENCE`, in a fixed order."""
    lexicon = _analyzer().lexicon
    kept = {
        w
        for w in words.split()
        if w.isalpha() and len(w) >= 3 and w in lexicon and sign * lexicon[w] >= _MIN_ABS_VALENCE
    }
    return tuple(sorted(kept))  # sorted: the same seed must give the same reviews on every machine


@functools.lru_cache(maxsize=1)
def _vocabulary() -> dict[str, dict[int, tuple[str, ...]]]:
    """Sentiment words by part of speech and polarity (+1 / -1), drawn from VADER's lexicon."""
    return {
        "adjective": {1: _filter_words(_POSITIVE_ADJECTIVES, sign=1), -1: _filter_words(_NEGATIVE_ADJECTIVES, sign=-1)},
        "adverb": {1: _filter_words(_POSITIVE_ADVERBS, sign=1), -1: _filter_words(_NEGATIVE_ADVERBS, sign=-1)},
        "verb": {1: _filter_words(_POSITIVE_VERBS, sign=1), -1: _filter_words(_NEGATIVE_VERBS, sign=-1)},
    }


def sentiment_words() -> dict[str, dict[int, tuple[str, ...]]]:
    """The generator's sentiment vocabulary: {part of speech: {+1: words, -1: words}}, for inspection."""
    return _vocabulary()


def _lead(rng: random.Random) -> str:
    """A neutral opening ending in a copula, at least four words long ("This new drama was")."""
    det, desc, genre = rng.choice(_DETERMINERS), rng.choice(_DESCRIPTORS), rng.choice(_GENRES)
    if rng.random() < 0.2:
        return f"I watched {det.lower()} {desc} {genre} and it {rng.choice(_PAST_COPULAS)}"
    return f"{det} {desc} {genre} {rng.choice(_COPULAS)}"


def _predicate(rng: random.Random, *, polarity: int, aspect_participle: str) -> str:
    """What follows a copula: a (modified) adjective, or an adverb + participle ("badly written")."""
    vocab = _vocabulary()
    if rng.random() < 0.25:
        return f"{rng.choice(vocab['adverb'][polarity])} {aspect_participle}"
    modifier = rng.choice(_ADJECTIVE_MODIFIERS)
    word = rng.choice(vocab["adjective"][polarity])
    return f"{modifier} {word}".strip()


def _clause(rng: random.Random, *, polarity: int) -> str:
    """A clause after a connector: "acting was very good" or "I loved the ending" style."""
    aspect, participle = rng.choice(_ASPECTS)
    if rng.random() < 0.2:
        verb = rng.choice(_vocabulary()["verb"][polarity])
        modifier = rng.choice(_VERB_MODIFIERS)
        return f"I {modifier} {verb} the {aspect}".replace("  ", " ")
    return f"{aspect} {rng.choice(_PAST_COPULAS)} " + _predicate(rng, polarity=polarity, aspect_participle=participle)


def _candidate(rng: random.Random, *, positive_share: float) -> str:
    """One review: neutral lead + predicate, then 1-4 clauses, each positive with `positive_share`."""

    def polarity() -> int:
        return 1 if rng.random() < positive_share else -1

    text = f"{_lead(rng)} {_predicate(rng, polarity=polarity(), aspect_participle='made')}"
    for _ in range(rng.randint(1, 4)):
        connector = rng.choice(_CONNECTORS)
        clause = _clause(rng, polarity=polarity())
        if clause.startswith("I "):  # a verb clause has its own subject: drop the connector's article
            connector = connector.removesuffix(" the").removesuffix(" The")
        text = f"{text}{connector} {clause}"
        if len(text.split()) >= _MAX_WORDS - 6:
            break
    if rng.random() < 0.3:
        text = f"{text}. {rng.choice(_CLOSINGS)} " + _predicate(rng, polarity=polarity(), aspect_participle="made")
    text += rng.choice((".", ".", ".", "!"))
    return text


def _fits(text: str) -> bool:
    return _MIN_WORDS <= len(text.split()) <= _MAX_WORDS


def generate_reviews(n: int, *, seed: int) -> list[str]:
    """`n` short film reviews (12-30 words, plain ASCII, one line each) of mixed sentiment.

    Each review aims at a target VADER compound drawn uniformly from [-1, 1]: the share of positive clauses
    follows the target, and candidates are drawn until one lands near it (or the closest of a bounded number
    is kept), so the compounds spread over the whole range instead of clustering at the extremes.
    Deterministic for a seed.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(seed)
    reviews = []
    for _ in range(n):
        target = rng.uniform(-1.0, 1.0)
        best, best_error = "", float("inf")
        tries = 0
        while best_error > _TARGET_TOLERANCE and (tries < _MAX_CANDIDATES or not best):
            text = _candidate(rng, positive_share=(1.0 + target) / 2.0)
            tries += 1
            if not _fits(text):
                continue
            error = abs(float(sentiment_reward([text])[0]) - target)
            if error < best_error:
                best, best_error = text, error
        reviews.append(best)
    return reviews


def _split_words(text: str, k: int) -> tuple[str, str]:
    """Split after the `k`-th word: ("This new drama", " was very good ..."). The space goes right."""
    words = text.split(" ")
    return " ".join(words[:k]), " " + " ".join(words[k:])


# Every lead has at least four neutral words, so longer prefixes would start to contain sentiment.
_MAX_PREFIX_WORDS = 4


def review_prompts(n: int, *, seed: int, prefix_words: int = 3) -> list[str]:
    """`n` review prefixes to prompt the models with: the first `prefix_words` (2-4) words of reviews.

    The prefixes are neutral openings ("This new drama was"), like the IMDb prefixes of the paper. They are
    cut from `generate_reviews(n, seed=seed)`: use a seed other than the SFT data's for fresh prompts.
    """
    if not 2 <= prefix_words <= _MAX_PREFIX_WORDS:
        raise ValueError(f"prefix_words must be in [2, {_MAX_PREFIX_WORDS}], got {prefix_words}")
    return [_split_words(text, prefix_words)[0] for text in generate_reviews(n, seed=seed)]


def sft_rows(n: int, *, seed: int, prefix_words: int = 3) -> list[dict[str, str]]:
    """`n` rows {"prompt", "chosen", "rejected"} for SFT of the reference model.

    prompt + chosen is a whole generated review (the continuation starts with its separating space); the SFT
    loss reads only those. rejected is the continuation of the next review, there only so the rows fit the
    pair schema, and always differs from chosen.
    """
    if not 2 <= prefix_words <= _MAX_PREFIX_WORDS:
        raise ValueError(f"prefix_words must be in [2, {_MAX_PREFIX_WORDS}], got {prefix_words}")
    # One extra review so the last row has a partner.
    reviews = generate_reviews(n + 1, seed=seed)
    splits = [_split_words(text, prefix_words) for text in reviews]
    rows = []
    for i in range(n):
        prompt, chosen = splits[i]
        # The next review's continuation, skipping the (rare) identical ones: chosen != rejected always.
        others = (splits[(i + k) % len(splits)][1] for k in range(1, len(splits)))
        rejected = next((c for c in others if c != chosen), None)
        if rejected is None:
            raise RuntimeError("all generated reviews share one continuation; use a larger n")
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def sentiment_reward(texts: Sequence[str]) -> np.ndarray:
    """VADER compound score of each text: float64, shape (len(texts),), in [-1, 1]."""
    analyzer = _analyzer()
    return np.array([analyzer.polarity_scores(t)["compound"] for t in texts], dtype=np.float64)


def label_pairs(prompt: str, completions: Sequence[str], *, min_gap: float = 0.1) -> list[dict[str, str]]:
    """Preference pairs from the completions of one prompt, labelled by sentiment reward.

    Every ordered pair (i, j) whose reward (VADER compound of prompt + completion) differs by at least
    `min_gap` becomes {"prompt", "chosen": the higher, "rejected": the lower}, as the paper builds its IMDb
    pairs from four samples per prefix. Identical texts are never paired, and a repeated (chosen, rejected)
    pair is kept once. `min_gap` must be positive, or equal rewards would give contradictory pairs.
    """
    if min_gap <= 0:
        raise ValueError(f"min_gap must be > 0, got {min_gap}")
    # Completions continue the prompt text (they carry their own leading space), so they are joined as is.
    rewards = sentiment_reward([prompt + c for c in completions])
    pairs, seen = [], set()
    for i, chosen in enumerate(completions):
        for j, rejected in enumerate(completions):
            if chosen == rejected or rewards[i] - rewards[j] < min_gap or (chosen, rejected) in seen:
                continue
            seen.add((chosen, rejected))
            pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return pairs
