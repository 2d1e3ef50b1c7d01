"""A seeded, learnable text-classification data set made of real English words.

Each class owns a disjoint set of "topic" words; every text mixes words of its class's topic
(the signal) with words drawn from a shared pool (the noise). ``difficulty`` in [0, 1) lowers the
share of signal words, ``label_noise`` flips labels at random. Real words matter: a real
WordPiece tokenizer then produces ordinary tokens, so the whole pipeline (tokenizer, pre-trained
model, FedAvg) runs offline on data a model can actually learn.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from . import FedsweepError
from .dataspec import SYNTHETIC_DEFAULTS

# Common English words. The first part is split into per-class topic words, the rest is noise.
_WORDS = """
market stock shares profit bank economy trade price oil investor dollar company deal earnings
growth rates budget tax inflation revenue quarter sales billion merger retail industry credit
game team season player coach win league match score goal cup championship final race olympic
title victory tournament striker pitcher inning medal sprint rugby tennis golf soccer hockey
election minister government president war troops police court law vote parliament treaty
army leader protest border rebel embassy crisis capital summit talks diplomat campaign senate
software computer internet phone network data space research scientists technology chip web
online digital program device robot satellite mobile browser launch science energy climate
movie film actor story plot scene director music song album drama comedy character script
camera screen theater actress sequel performance soundtrack ending romance horror cinema
food restaurant dinner menu chicken pizza service waiter table dessert coffee breakfast taste
salad burger sauce flavor kitchen chef lunch drinks bread noodle fries steak sushi cheese
hotel room travel flight airport beach island tour ticket guide museum view pool resort
journey vacation train cruise map station harbor mountain lake forest village valley river
doctor hospital patient health medicine nurse disease therapy vaccine surgery clinic virus
treatment drug symptoms recovery heart brain blood cancer diet fitness sleep pain healing
school student teacher class exam lesson college library homework grade campus lecture
degree course reading writing history math physics biology chemistry essay project tutor
the a an and or but if then when while because so very really quite just also still even
of to in on at by for with from about into over after before under between through during
is was are were be been being have has had do does did will would can could should may might
this that these those it its they them their we our you your he she his her one two three
some many much more most few less other such same new old good bad great small large long
time day year week month today night morning people thing way place world life hand part
make take give come go see know think look want use find tell ask work seem feel try leave
call keep let begin show hear play run move live believe bring happen write sit stand lose
pay meet include continue set learn change lead understand watch follow stop create speak
read spend grow open walk offer remember consider appear buy wait serve die send expect
build stay fall cut reach kill remain suggest raise pass sell require report decide pull
""".split()


def _topics(num_classes: int, words_per_class: int) -> tuple[list[list[str]], list[str]]:
    need = num_classes * words_per_class
    if need > len(_WORDS) // 2:
        raise FedsweepError(
            f"synthetic: num_classes={num_classes} x topic_words={words_per_class} needs {need} words, "
            f"more than the {len(_WORDS) // 2} topic words available"
        )
    topics = [_WORDS[c * words_per_class : (c + 1) * words_per_class] for c in range(num_classes)]
    return topics, _WORDS[need:]


_D = SYNTHETIC_DEFAULTS


def generate(
    num_classes: int = _D["num_classes"],
    train_size: int = _D["train_size"],
    test_size: int = _D["test_size"],
    difficulty: float = _D["difficulty"],
    label_noise: float = _D["label_noise"],
    min_words: int = _D["min_words"],
    max_words: int = _D["max_words"],
    topic_words: int = _D["topic_words"],
    seed: int = _D["seed"],
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return (train, test) frames with columns ``text`` (str) and ``label`` (int64 0..C-1).

    Classes are balanced up to rounding (labels drawn uniformly). At ``difficulty=0`` 40% of the
    words are topic words, falling linearly to 4% at ``difficulty=0.9``.
    """
    for name, value, ok in [
        ("num_classes", num_classes, num_classes >= 2),
        ("train_size", train_size, train_size >= 1),
        ("test_size", test_size, test_size >= 1),
        ("difficulty", difficulty, 0.0 <= difficulty < 1.0),
        ("label_noise", label_noise, 0.0 <= label_noise < 1.0),
        ("min_words", min_words, 1 <= min_words <= max_words),
        ("topic_words", topic_words, topic_words >= 1),
    ]:
        if not ok:
            raise FedsweepError(f"synthetic: invalid {name}={value!r}")
    topics, noise = _topics(num_classes, topic_words)
    signal_share = 0.4 * (1.0 - difficulty)
    rng = np.random.default_rng(seed)

    def make(n: int) -> pd.DataFrame:
        labels = rng.integers(0, num_classes, size=n)
        lengths = rng.integers(min_words, max_words + 1, size=n)
        texts = []
        for label, length in zip(labels, lengths):
            is_signal = rng.random(length) < signal_share
            topic = topics[label]
            words = [
                topic[rng.integers(len(topic))] if s else noise[rng.integers(len(noise))]
                for s in is_signal
            ]
            texts.append(" ".join(words).capitalize() + ".")
        flip = rng.random(n) < label_noise
        labels = np.where(flip, rng.integers(0, num_classes, size=n), labels)
        return pd.DataFrame({"text": texts, "label": labels.astype("int64")})

    # Train is generated first so that test_size does not change the training examples.
    train = make(train_size)
    test = make(test_size)
    return train, test
