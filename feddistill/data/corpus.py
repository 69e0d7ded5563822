"""An embedded, offline, synthetic topic-classification corpus (the default dataset).

Why synthetic: tests, the simulation and a first ``flwr run`` must work without network access and
without a dataset download, yet the task must be hard enough that a student, a teacher and their
distillation gap can be told apart. So the generator is built to be *learnable but not trivial*:

* every class has its own topic words (the signal);
* all classes share a large pool of generic news words, function words, places and times that
  carry no signal, and most of every sentence is made of them;
* a set of ambiguous words ("market", "season", "trial", ...) is used by two or more classes
  with different weights, so single words are only weak evidence;
* a topic slot sometimes holds a word of another class (a confuser), and some sentences are
  genuinely mixed between two classes, so even a perfect model cannot reach 100%;
* a fraction ``label_noise`` of the *training* labels is flipped to another class.

Calibration: a bag-of-words logistic regression trained on 4,000 examples (four classes,
``label_noise=0.1``) scores 78-81% on 1,000 clean test examples (seeds 0-2), far above the 25%
chance level and far below 100%; trained on 40,000 noise-free examples it still tops out near
84%, because mixed sentences and confusers make part of the test set undecidable. A 2-layer,
hidden-64 BERT trained on the same 4,000 examples reaches about 81%. The difficulty test in
``tests/data/test_data_corpus.py`` pins the band. The vocabulary has about 450 distinct words
with four classes and about 575 with all eight.

Determinism: everything is drawn from one :class:`numpy.random.Generator` seeded with ``seed``,
and every vocabulary is a tuple, so output does not depend on ``PYTHONHASHSEED``.
"""

from __future__ import annotations

import math

import datasets
import numpy as np

from feddistill.data.errors import DataError

__all__ = ["CORPUS_LABELS", "make_corpus", "make_train_test"]


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


CORPUS_LABELS: tuple[str, ...] = (
    "world",
    "sports",
    "business",
    "science",
    "health",
    "entertainment",
    "politics",
    "technology",
)

# Topic words: one tuple per class, in CORPUS_LABELS order. A topic word belongs to one class
# and to no other pool (tests check this).
_TOPIC_WORDS: tuple[tuple[str, ...], ...] = tuple(
    _words(text)
    for text in (
        (  # world
            "embassy ceasefire refugees diplomats treaty humanitarian envoy militants insurgents "
            "peacekeepers sanctions foreign ambassador border troops airstrike hostages asylum "
            "famine rebels militia kingdom republic nato occupation consulate evacuation exiles "
            "warlords truce"
        ),
        (  # sports
            "striker goalkeeper tournament championship playoffs quarterback midfielder innings "
            "stadium referee semifinal medal olympic marathon sprinter pitcher touchdown wicket "
            "batsman defender coach squad fixture knockout halftime rebounds homer derby tennis "
            "golfer"
        ),
        (  # business
            "shareholders dividend earnings merger acquisition revenue profits quarterly investors "
            "stocks bonds retailer bankruptcy layoffs inflation lender mortgage wholesale "
            "commodities exports tariffs ceo franchise brokerage payroll subsidiary valuation ipo "
            "audit supplier"
        ),
        (  # science
            "telescope astronomers physicists particle galaxy fossil genome molecule laboratory "
            "experiment hypothesis species evolution climate glacier orbit asteroid chemists "
            "quantum neutrino specimen microscope archaeologists volcano comet biologists enzyme "
            "isotope sediment spectrum"
        ),
        (  # health
            "patients vaccine hospital doctors nurses clinic diabetes cancer surgery symptoms "
            "infection obesity diet outbreak antibiotics pharmacy therapy diagnosis cardiac "
            "pediatric influenza dementia prescription epidemic nutrition immunity stroke asthma "
            "dosage wellness"
        ),
        (  # entertainment
            "actor actress film movie album singer concert premiere director sequel celebrity "
            "hollywood soundtrack comedian sitcom musical festival oscar grammy rapper band "
            "novelist screenplay trailer broadway choreographer tabloid debut rehearsal documentary"
        ),
        (  # politics
            "senator congress parliament lawmakers legislation ballot governor senate republicans "
            "democrats referendum filibuster candidate caucus incumbent bill veto primaries "
            "constituents coalition opposition cabinet impeachment lobbyists mayor poll partisan "
            "amendment electorate pollsters"
        ),
        (  # technology
            "software smartphone startup processor chip app browser algorithm encryption hackers "
            "semiconductor laptop server cloud bandwidth robotics gadget firmware silicon "
            "broadband programmers website database malware upgrade developers wireless tablet "
            "microchip internet"
        ),
    )
)

# Ambiguous words: used by several classes with different weights (index = CORPUS_LABELS).
#                       wor spo bus sci hea ent pol tec
_AMBIGUOUS_WORDS: tuple[tuple[str, tuple[int, ...]], ...] = (
    ("market", (1, 0, 3, 0, 0, 0, 0, 1)),
    ("launch", (0, 0, 1, 2, 0, 1, 0, 2)),
    ("election", (2, 0, 0, 0, 0, 0, 3, 0)),
    ("record", (0, 3, 1, 0, 0, 2, 0, 0)),
    ("star", (0, 2, 0, 1, 0, 3, 0, 0)),
    ("trial", (1, 0, 0, 1, 2, 0, 1, 0)),
    ("virus", (0, 0, 0, 0, 3, 0, 0, 2)),
    ("network", (0, 0, 1, 0, 0, 1, 0, 2)),
    ("season", (0, 3, 0, 0, 0, 2, 0, 0)),
    ("growth", (0, 0, 3, 1, 1, 0, 0, 0)),
    ("campaign", (0, 1, 1, 0, 0, 1, 3, 0)),
    ("crisis", (2, 0, 2, 0, 1, 0, 1, 0)),
    ("deal", (1, 1, 3, 0, 0, 0, 1, 0)),
    ("data", (0, 0, 1, 2, 1, 0, 0, 3)),
    ("study", (0, 0, 0, 3, 3, 0, 0, 0)),
    ("security", (2, 0, 0, 0, 0, 0, 1, 2)),
    ("space", (0, 0, 0, 3, 0, 0, 0, 1)),
    ("energy", (1, 0, 2, 2, 0, 0, 0, 0)),
    ("rally", (0, 2, 1, 0, 0, 0, 2, 0)),
    ("title", (0, 3, 0, 0, 0, 1, 0, 0)),
    ("contract", (0, 2, 2, 0, 0, 0, 0, 1)),
    ("research", (0, 0, 0, 3, 2, 0, 0, 1)),
    ("injury", (0, 3, 0, 0, 2, 0, 0, 0)),
    ("strike", (2, 1, 2, 0, 0, 0, 0, 0)),
    ("team", (0, 3, 0, 1, 0, 0, 0, 1)),
    ("fans", (0, 3, 0, 0, 0, 3, 0, 0)),
    ("court", (1, 2, 0, 0, 0, 0, 2, 0)),
    ("platform", (0, 0, 0, 0, 0, 1, 1, 3)),
    ("storm", (2, 0, 0, 2, 0, 0, 0, 0)),
    ("drug", (1, 0, 1, 0, 3, 0, 0, 0)),
    ("minister", (3, 0, 0, 0, 0, 0, 2, 0)),
    ("president", (2, 0, 1, 0, 0, 0, 3, 0)),
    ("league", (0, 3, 0, 0, 0, 1, 0, 0)),
    ("award", (0, 1, 0, 1, 0, 3, 0, 0)),
    ("series", (0, 2, 0, 0, 0, 2, 0, 1)),
    ("chart", (0, 0, 2, 1, 0, 2, 0, 0)),
    ("stream", (0, 0, 0, 0, 0, 2, 0, 2)),
    ("shares", (0, 0, 3, 0, 0, 0, 0, 1)),
    ("bank", (1, 0, 3, 0, 0, 0, 0, 0)),
    ("vote", (0, 0, 0, 0, 0, 1, 3, 0)),
    ("talks", (3, 0, 1, 0, 0, 0, 2, 0)),
    ("protest", (2, 0, 0, 0, 0, 0, 2, 0)),
    ("power", (2, 0, 1, 1, 0, 0, 1, 1)),
    ("model", (0, 0, 1, 2, 0, 1, 0, 2)),
    ("score", (0, 3, 0, 0, 1, 1, 0, 0)),
    ("test", (0, 1, 0, 2, 2, 0, 0, 1)),
    ("treatment", (0, 0, 0, 1, 3, 0, 0, 0)),
    ("policy", (0, 0, 1, 0, 1, 0, 3, 0)),
    ("budget", (0, 0, 2, 0, 0, 1, 2, 0)),
    ("oil", (2, 0, 2, 1, 0, 0, 0, 0)),
    ("screen", (0, 0, 0, 0, 1, 2, 0, 2)),
    ("release", (0, 0, 1, 0, 0, 2, 0, 2)),
    ("game", (0, 3, 0, 0, 0, 1, 0, 2)),
    ("satellite", (1, 0, 0, 2, 0, 0, 0, 2)),
    ("pandemic", (1, 0, 1, 0, 3, 0, 0, 0)),
    ("summit", (3, 0, 1, 0, 0, 0, 1, 0)),
)

# Shared pools: generic news words every class uses with the same distribution (no signal).
_NOUNS: tuple[str, ...] = _words(
    "people officials experts analysts residents leaders members groups reports plans "
    "sources statement decision news details changes results effort issue problem "
    "situation move step event time day week month year weekend morning evening number "
    "part future change process case point side level role way hopes concerns questions "
    "fears signs efforts story announcement meeting review response impact critics "
    "observers spokesperson organizers authorities community families workers visitors "
    "crowds figures numbers rules standards goals targets costs prices demand pressure "
    "support interest attention progress delays problems options risks benefits "
    "schedule deadline proposal agreement warning update program project system center "
    "office board panel committee council agency industry sector region area city town "
    "country nation locals public audience partners rivals challenge success failure"
)
_VERBS: tuple[str, ...] = _words(
    "said announced reported confirmed expected warned agreed rejected welcomed criticized "
    "revealed showed began faced raised cut added delayed prepared planned called left "
    "joined claimed denied described suggested promised questioned returned received "
    "approved postponed unveiled completed continued discussed highlighted dismissed "
    "praised predicted doubled ended opened tracked reviewed backed blamed cited"
)
_ADJECTIVES: tuple[str, ...] = _words(
    "new major big small latest early late recent key top local national international "
    "global final first second long short strong weak surprising unexpected important rare "
    "historic annual public private official possible likely several many higher lower "
    "large significant growing modest sharp slow quick young senior former full fresh "
    "ongoing controversial popular"
)
_PLACES: tuple[str, ...] = (
    "in the capital",
    "across the region",
    "in the north",
    "in the south",
    "in the east",
    "in the west",
    "at home",
    "overseas",
    "nationwide",
    "downtown",
    "on the coast",
    "near the border town",
    "in several cities",
    "abroad",
)
_TIMES: tuple[str, ...] = (
    "on monday",
    "on tuesday",
    "on wednesday",
    "on thursday",
    "on friday",
    "on saturday",
    "on sunday",
    "this week",
    "last week",
    "late on friday",
    "earlier this month",
    "last year",
    "overnight",
    "yesterday",
    "today",
    "this morning",
    "after months of waiting",
)
_NUMBERS: tuple[str, ...] = (
    "two",
    "three",
    "four",
    "five",
    "several",
    "dozens of",
    "hundreds of",
    "thousands of",
    "12",
    "40",
    "300",
)
_CONNECTORS: tuple[str, ...] = (", and", ", while", ", as", ", but", "after", "; meanwhile")

# Clause skeletons. {T} is a topic slot (the only place class evidence enters); {S} {V} {J} {L}
# {W} {N} are shared noun / verb / adjective / place / time / number slots.
_CLAUSES: tuple[str, ...] = (
    "the {J} {T} {V} {J} {S} {W}",
    "{S} {V} the {T} {L} {W}",
    "{N} {S} {V} that the {T} would face {J} {S}",
    "a {J} {S} about the {T} {V} {S} {L}",
    "{J} {S} over {T} and {T} {V} {W}",
    "the {T} {S} {V} {J} {S} amid {J} {S}",
    "officials {V} the {T} after {N} {S} {L}",
    "{S} close to the {T} {V} {J} {S} {W}",
    "the {J} {T} is {J} for {S} {L}",
    "{J} {S} from the {T} {V} {N} {S}",
    "the {T} {V} {S} by {N} {S} {W}",
    "{S} {V} the {J} {T} could change the {S}",
    "many {S} {V} the {T} {S} {L}",
    "the {S} of the {T} {V} {J} {W}",
    "{T} {S} {V} {J} {S} for the {T}",
    "a {J} {T} {V} {S} and {S} {L}",
    "the {J} {S} {V} a {J} {T} {S} {W}",
    "{S} and {S} {V} the {S} {W}",
)

_MIN_WORDS = 8
_MAX_WORDS = 30

# How a topic slot is filled (see module docstring). The remaining probability mass,
# 1 - own - ambiguous - confuser, fills it with a shared noun. Tuned so that the bag-of-words
# baseline lands near 80% (4 classes, 4,000 training examples, label_noise=0.1).
_P_OWN_TOPIC = 0.70
_P_AMBIGUOUS = 0.18
_P_CONFUSER = 0.05
# Fraction of sentences that are genuinely about two classes: their topic slots draw from the
# labelled class and a second class with equal odds.
_P_MIXED_SENTENCE = 0.15

_TEST_STREAM = 1  # derives the test-set seed, so train and test never share a random stream


def _check_arguments(num_examples: int, num_classes: int, label_noise: float, seed: int) -> None:
    if num_examples < 0:
        raise DataError(f"num_examples must be >= 0, got {num_examples}.")
    if not 2 <= num_classes <= len(CORPUS_LABELS):
        raise DataError(
            f"num_classes must be between 2 and {len(CORPUS_LABELS)} (the embedded corpus "
            f"has classes {list(CORPUS_LABELS)}), got {num_classes}."
        )
    if not (math.isfinite(label_noise) and 0.0 <= label_noise < 1.0):
        raise DataError(f"label_noise must be in [0, 1), got {label_noise}.")
    if seed < 0:
        raise DataError(f"seed must be a non-negative integer, got {seed}.")


def _ambiguous_cdfs(num_classes: int) -> tuple[list[str], np.ndarray]:
    """Per-class cumulative distribution over the ambiguous words the active classes use."""
    words = [w for w, weights in _AMBIGUOUS_WORDS if any(weights[:num_classes])]
    weights = np.array(
        [weights[:num_classes] for _, weights in _AMBIGUOUS_WORDS if any(weights[:num_classes])],
        dtype=np.float64,
    ).T  # (num_classes, num_words)
    cdfs = np.cumsum(weights / weights.sum(axis=1, keepdims=True), axis=1)
    return words, cdfs


def _generate(
    num_examples: int,
    num_classes: int,
    label_noise: float,
    rng: np.random.Generator,
) -> tuple[list[str], list[int]]:
    amb_words, amb_cdfs = _ambiguous_cdfs(num_classes)

    def pick(pool: tuple[str, ...] | list[str]) -> str:
        return pool[int(rng.integers(len(pool)))]

    def topic_word(cls: int, second: int | None) -> str:
        # A mixed sentence is about `cls` and `second` in equal measure.
        if second is not None and rng.random() < 0.5:
            cls = second
        u = rng.random()
        if u < _P_OWN_TOPIC:
            return pick(_TOPIC_WORDS[cls])
        u -= _P_OWN_TOPIC
        if u < _P_AMBIGUOUS:
            index = int(np.searchsorted(amb_cdfs[cls], rng.random(), side="right"))
            return amb_words[min(index, len(amb_words) - 1)]
        u -= _P_AMBIGUOUS
        if u < _P_CONFUSER:
            other = int(rng.integers(num_classes - 1))
            return pick(_TOPIC_WORDS[other + (other >= cls)])
        return pick(_NOUNS)

    def clause(cls: int, second: int | None) -> list[str]:
        fillers = {
            "{T}": lambda: topic_word(cls, second),
            "{S}": lambda: pick(_NOUNS),
            "{V}": lambda: pick(_VERBS),
            "{J}": lambda: pick(_ADJECTIVES),
            "{L}": lambda: pick(_PLACES),
            "{W}": lambda: pick(_TIMES),
            "{N}": lambda: pick(_NUMBERS),
        }
        words: list[str] = []
        for token in pick(_CLAUSES).split():
            words.extend(fillers[token]().split() if token in fillers else [token])
        return words

    # Exactly balanced labels (counts differ by at most one), in random order.
    labels = rng.permutation(np.arange(num_examples) % num_classes)
    texts: list[str] = []
    for cls in labels.tolist():
        second = None
        if rng.random() < _P_MIXED_SENTENCE:
            other = int(rng.integers(num_classes - 1))
            second = other + (other >= cls)
        target = int(rng.integers(_MIN_WORDS, _MAX_WORDS + 1))
        words = clause(cls, second)
        while len(words) < target:
            connector = pick(_CONNECTORS).split()
            nxt = clause(cls, second)
            if len(words) + len(connector) + len(nxt) > _MAX_WORDS:
                if len(words) >= _MIN_WORDS:
                    break
                continue  # too short still: draw another (shorter) clause
            if connector[0] in (",", ";"):
                words[-1] += connector[0]
                connector = connector[1:]
            words += connector + nxt
        words = [
            "an" if w == "a" and nxt[0] in "aeiou" else w
            for w, nxt in zip(words, [*words[1:], "."], strict=True)
        ]
        sentence = " ".join(words)
        texts.append(sentence[0].upper() + sentence[1:] + ".")

    # Flip exactly round(label_noise * n) labels to a uniformly drawn *other* class.
    noisy = labels.copy()
    num_flipped = round(label_noise * num_examples)
    flip = rng.choice(num_examples, size=num_flipped, replace=False)
    offsets = rng.integers(1, num_classes, size=num_flipped)
    noisy[flip] = (noisy[flip] + offsets) % num_classes
    return texts, [int(y) for y in noisy]


def make_corpus(
    num_examples: int,
    *,
    num_classes: int = 4,
    label_noise: float = 0.1,
    seed: int = 0,
) -> tuple[list[str], list[int]]:
    """Generate ``num_examples`` short news-like sentences and their topic labels.

    Args:
        num_examples: how many sentences to generate.
        num_classes: how many of :data:`CORPUS_LABELS` to use (the first ``num_classes``).
        label_noise: fraction of labels replaced by a uniformly drawn *other* class; exactly
            ``round(label_noise * num_examples)`` labels are flipped, so the rate is testable.
        seed: the same seed always gives identical output (independent of ``PYTHONHASHSEED``).

    Returns:
        ``(texts, labels)``: 8–30 word sentences and integer labels in ``[0, num_classes)``.
        Classes are balanced before noise (counts differ by at most one).
    """
    _check_arguments(num_examples, num_classes, label_noise, seed)
    return _generate(num_examples, num_classes, label_noise, np.random.default_rng(seed))


def make_train_test(
    num_train: int,
    num_test: int,
    *,
    num_classes: int = 4,
    label_noise: float = 0.1,
    seed: int = 0,
) -> tuple[datasets.Dataset, datasets.Dataset, list[str]]:
    """Build train and test ``datasets.Dataset`` objects (columns ``text``, ``label``).

    The training set equals ``make_corpus(num_train, ..., seed=seed)``. The test set is drawn
    from a separate random stream derived from ``seed`` and has *no* label noise, so test
    accuracy measures how well the true topic is recovered, not how well noise is memorised.

    Returns:
        ``(train, test, label_names)`` where ``label_names[i]`` names class ``i``.
    """
    _check_arguments(num_train, num_classes, label_noise, seed)
    _check_arguments(num_test, num_classes, 0.0, seed)
    train_texts, train_labels = _generate(
        num_train, num_classes, label_noise, np.random.default_rng(seed)
    )
    test_rng = np.random.default_rng(np.random.SeedSequence([seed, _TEST_STREAM]))
    test_texts, test_labels = _generate(num_test, num_classes, 0.0, test_rng)
    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.Value("int64")}
    )
    train = datasets.Dataset.from_dict(
        {"text": train_texts, "label": train_labels}, features=features
    )
    test = datasets.Dataset.from_dict({"text": test_texts, "label": test_labels}, features=features)
    return train, test, list(CORPUS_LABELS[:num_classes])
