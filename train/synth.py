"""Synthetic speech for the demo models: espeak-ng sentences with exact word times, written as JSONL manifests.

    python -m train.synth --out data/demo --train 4000 --val 200 --test 400 --seed 0

Each utterance is a sentence from a small grammar over a few hundred words and numbers (English and German),
spoken by one espeak-ng voice variant at one speed and pitch; in the train split a share of the utterances
(``--short-fraction``) are phrases of one to three words instead. Every word is synthesised on its own, trimmed to
the samples espeak-ng actually voiced, and the words are joined with random pauses, so each word's start and
end are known exactly. Leading and trailing silence, gain and additive noise (white, pink, brown or mains hum at
a random SNR) vary per utterance.

The splits differ in two ways, both by construction:

- sentences: a sentence belongs to the split its text hashes to (5% test, 5% validation, 90% train), so no
  sentence of one split can ever be generated for another, whatever the seed;
- voices: each espeak-ng voice variant (``m3``, ``f2``, ``klatt4``, ``Alicia``, ...) belongs to one split, so
  test voices are never heard in training.

``--voices`` replaces every split's variants with the ones named, e.g. a domain of voices that no split uses
(``UNHEARD_VARIANTS``: robotic echoes, a croak, distorted formants) for adapting the demo model
(``python -m train.adapt_demo``); sentences stay split by their hash, so a domain's test sentences are unseen
sentences too::

    python -m train.synth --out data/domain --train 1600 --val 100 --test 200 --seed 1 --voices croak,kaukovalta,Tweaky

Manifest rows (one JSON object per line, in ``<out>/<split>.jsonl``)::

    {"id": "test-en-00007", "audio": "test/test-en-00007.flac", "text": "The dog sees 3 red cats.",
     "ctc_text": "the dog sees 3 red cats", "language": "English", "duration": 2.871, "voice": "en-us+m2", "rate": 171, "pitch": 44,
     "noise": "pink", "snr_db": 23.5,
     "words": [{"text": "The", "start": 0.412, "end": 0.561}, ...]}

``audio`` is relative to the manifest's directory; ``ctc_text`` is the transcript as a sequence of the grammar's
words, each written as it is mid-sentence (no sentence case, no punctuation: the sounds alone decide it; the
CTC labels of training); ``words`` hold the aligner's words (letters, digits and
apostrophes only) with times in seconds in the 16 kHz file. The same ``--seed`` and counts give the same rows and
the same audio, except with the variants that add noise to the voice (the Klatt variants, m6, ...): that noise
comes from a generator inside espeak-ng that carries on from call to call and that no API resets, so their
samples, and a word's length by a few samples, differ from run to run (the texts, voices and parameters do not).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import ctypes
import dataclasses
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import soundfile
import soxr

SAMPLE_RATE = 16000
SPLITS = ("train", "val", "test")

# --------------------------------------------------------------------------------------------------------------
# Voices

# espeak-ng accents per language; every accent is used in every split (they change pronunciation, which the
# model must know), while the voice variants below are split.
ACCENTS: dict[str, tuple[str, ...]] = {
    "English": (
        "en", "en-us", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-029", "en-us-nyc",
    ),
    "German": ("de",),
}  # fmt: skip

# espeak-ng voice variants (files in espeak-ng-data/voices/!v) by split. Left out everywhere: whispering
# (whisper, whisperf), a demon filter (Demonic), a speed override (fast) and a name with a space (Mr serious).
# Left out of training: the variants with long echoes (robosoft*, UniRobot, anikaRobot, RicishayMax*), a
# croak, and the most distorted formants (kaukovalta, Tweaky); no test or validation voice is like them, and a
# small model learns the others faster without them. Left out everywhere: rob (espeak-ng 1.51 crashes voicing
# some German words with it, e.g. "freundlichen").
VARIANTS: dict[str, tuple[str, ...]] = {
    "test": ("m2", "f4", "klatt2", "Alicia", "iven3", "Gene2"),
    "val": ("m6", "f1", "klatt5", "Henrique", "linda"),
    "train": (
        "m1", "m3", "m4", "m5", "m7", "m8", "f2", "f3", "f5", "klatt", "klatt3", "klatt4", "klatt6", "Alex",
        "Andrea", "Andy", "Annie", "AnxiousAndy", "Denis", "Diogo", "Gene", "Hugo", "Jacky", "Lee", "Marco",
        "Mario", "Michael", "Mike", "Nguyen", "Storm", "adam", "anika", "announcer", "antonio", "aunty",
        "belinda", "benjamin", "boris", "caleb", "david", "ed", "edward", "edward2", "grandma", "grandpa",
        "gustave", "iven", "iven2", "iven4", "john", "marcelo", "max", "michel", "miguel", "norbert", "pablo",
        "paul", "pedro", "quincy", "robert", "sandro", "shelby", "steph", "steph2", "steph3", "travis",
        "victor", "zac",
    ),
}  # fmt: skip
# The variants of no split above that espeak-ng voices in both languages: a domain of voices the demo model never
# heard (``--voices``), for adapting it. robosoft3 sounds as robosoft2 does, robosoft5 and robosoft7 as robosoft4.
UNHEARD_VARIANTS: tuple[str, ...] = (
    "robosoft", "robosoft2", "robosoft4", "robosoft6", "robosoft8", "UniRobot", "anikaRobot", "RicishayMax",
    "RicishayMax2", "RicishayMax3", "croak", "kaukovalta", "Tweaky",
)  # fmt: skip

# Speaking rate (espeak-ng words per minute), pitch and pitch range (0-100) are drawn per utterance.
RATE_RANGE = (130, 230)
PITCH_RANGE = (20, 80)
PITCH_SPREAD_RANGE = (20, 90)
# Sentences are redrawn until they have at most this many words, which keeps utterances under about 6 s.
MAX_WORDS = 8

# --------------------------------------------------------------------------------------------------------------
# English grammar. Words that sound like another word of the vocabulary or like a number (to/two, for/four,
# ate/eight, by/buy, blue/blew, read/red, sea/see, hour/our, ...) are left out so every transcript is determined
# by the audio.

EN_NOUNS: tuple[tuple[str, str], ...] = (
    ("cat", "cats"), ("dog", "dogs"), ("bird", "birds"), ("horse", "horses"), ("mouse", "mice"),
    ("lion", "lions"), ("tiger", "tigers"), ("monkey", "monkeys"), ("house", "houses"), ("garden", "gardens"),
    ("car", "cars"), ("train", "trains"), ("boat", "boats"), ("tree", "trees"), ("flower", "flowers"),
    ("apple", "apples"), ("teacher", "teachers"), ("doctor", "doctors"), ("child", "children"),
    ("friend", "friends"), ("kitchen", "kitchens"), ("garage", "garages"), ("window", "windows"),
    ("book", "books"), ("ball", "balls"), ("lamp", "lamps"),
)  # fmt: skip
EN_ADJECTIVES: tuple[str, ...] = (
    "red", "green", "black", "white", "big", "small", "old", "happy", "round", "warm", "cold", "funny",
)  # fmt: skip
# (base form, third person singular)
EN_TRANSITIVE_VERBS: tuple[tuple[str, str], ...] = (
    ("see", "sees"), ("find", "finds"), ("like", "likes"), ("want", "wants"), ("open", "opens"),
    ("carry", "carries"), ("paint", "paints"), ("watch", "watches"), ("help", "helps"), ("take", "takes"),
)  # fmt: skip
EN_INTRANSITIVE_VERBS: tuple[tuple[str, str], ...] = (
    ("sleep", "sleeps"), ("run", "runs"), ("sing", "sings"), ("wait", "waits"), ("jump", "jumps"),
    ("dance", "dances"),
)  # fmt: skip
EN_SINGULAR_PRONOUNS = ("he", "she", "it")
EN_PLURAL_PRONOUNS = ("I", "you", "we", "they")
EN_SINGULAR_DETERMINERS = ("the", "a", "this", "that", "my", "your")
EN_PLURAL_DETERMINERS = ("the", "these", "those", "my", "some", "many")
EN_PLACE_DETERMINERS = ("the", "my", "this")
EN_PREPOSITIONS = ("in", "near", "behind", "under", "on")
EN_ADVERBS = ("today", "tomorrow", "again", "now", "later", "often")
EN_FRONT_ADVERBS = ("today", "tomorrow", "now", "later")
NUMBERS: tuple[int, ...] = (*range(2, 13), 20, 30, 50, 100)


def _pick(rng: np.random.Generator, items: Sequence[Any]) -> Any:
    return items[int(rng.integers(len(items)))]


def _chance(rng: np.random.Generator, p: float) -> bool:
    return bool(rng.random() < p)


def _english_noun_phrase(rng: np.random.Generator, plural: bool, adjective_p: float = 0.5) -> list[str]:
    singular, plural_form = _pick(rng, EN_NOUNS)
    adjective = [_pick(rng, EN_ADJECTIVES)] if _chance(rng, adjective_p) else []
    if plural:
        determiner = str(_pick(rng, NUMBERS)) if _chance(rng, 0.4) else _pick(rng, EN_PLURAL_DETERMINERS)
        return [determiner, *adjective, plural_form]
    determiner = _pick(rng, EN_SINGULAR_DETERMINERS)
    if determiner == "a" and (adjective or [singular])[0][0] in "aeiou":
        determiner = "an"
    return [determiner, *adjective, singular]


def _english_subject(rng: np.random.Generator) -> tuple[list[str], bool]:
    """(words, whether the verb takes its third-person-singular form)."""
    roll = rng.random()
    if roll < 0.2:
        return [_pick(rng, EN_PLURAL_PRONOUNS)], False
    if roll < 0.35:
        return [_pick(rng, EN_SINGULAR_PRONOUNS)], True
    plural = _chance(rng, 0.35)
    return _english_noun_phrase(rng, plural), not plural


def _english_place(rng: np.random.Generator) -> list[str]:
    noun = _pick(rng, EN_NOUNS)[0]
    adjective = [_pick(rng, EN_ADJECTIVES)] if _chance(rng, 0.3) else []
    return [_pick(rng, EN_PREPOSITIONS), _pick(rng, EN_PLACE_DETERMINERS), *adjective, noun]


def english_sentence(rng: np.random.Generator) -> list[str]:
    """Words of one English sentence (no punctuation, sentence case applied later)."""
    roll = rng.random()
    if roll < 0.15:
        number = str(_pick(rng, NUMBERS))
        adjective = [_pick(rng, EN_ADJECTIVES)] if _chance(rng, 0.5) else []
        return ["there", "are", number, *adjective, _pick(rng, EN_NOUNS)[1], *_english_place(rng)]
    front = [_pick(rng, EN_FRONT_ADVERBS)] if _chance(rng, 0.15) else []
    subject, third_person = _english_subject(rng)
    if roll < 0.4:
        verb = _pick(rng, EN_INTRANSITIVE_VERBS)[third_person]
        words = [*front, *subject, verb]
        if _chance(rng, 0.6):
            words += _english_place(rng)
    else:
        verb = _pick(rng, EN_TRANSITIVE_VERBS)[third_person]
        words = [*front, *subject, verb, *_english_noun_phrase(rng, _chance(rng, 0.4))]
        if _chance(rng, 0.35):
            words += _english_place(rng)
    if not front and _chance(rng, 0.3):
        words.append(_pick(rng, EN_ADVERBS))
    return words


def english_phrase(rng: np.random.Generator) -> list[str]:
    """One to three words: a noun phrase, a counted noun or a pronoun with a verb."""
    roll = rng.random()
    if roll < 0.2:
        return [_pick(rng, EN_NOUNS)[int(_chance(rng, 0.5))]]
    if roll < 0.5:
        return _english_noun_phrase(rng, _chance(rng, 0.4))
    if roll < 0.75:
        adjective = [_pick(rng, EN_ADJECTIVES)] if _chance(rng, 0.4) else []
        return [str(_pick(rng, NUMBERS)), *adjective, _pick(rng, EN_NOUNS)[1]]
    third_person = _chance(rng, 0.4)
    pronoun = _pick(rng, EN_SINGULAR_PRONOUNS if third_person else EN_PLURAL_PRONOUNS)
    return [pronoun, _pick(rng, (*EN_INTRANSITIVE_VERBS, *EN_TRANSITIVE_VERBS))[third_person]]


# --------------------------------------------------------------------------------------------------------------
# German grammar: nouns carry their gender, so articles and adjective endings agree in nominative, accusative
# and dative. Weak masculine nouns (Löwe, Affe, ...) are left out; their case endings would need a second table.

# (singular, plural, gender)
DE_NOUNS: tuple[tuple[str, str, str], ...] = (
    ("Hund", "Hunde", "m"), ("Katze", "Katzen", "f"), ("Vogel", "Vögel", "m"), ("Pferd", "Pferde", "n"),
    ("Maus", "Mäuse", "f"), ("Tiger", "Tiger", "m"), ("Haus", "Häuser", "n"), ("Garten", "Gärten", "m"),
    ("Auto", "Autos", "n"), ("Zug", "Züge", "m"), ("Boot", "Boote", "n"), ("Baum", "Bäume", "m"),
    ("Blume", "Blumen", "f"), ("Apfel", "Äpfel", "m"), ("Lehrer", "Lehrer", "m"), ("Kind", "Kinder", "n"),
    ("Freund", "Freunde", "m"), ("Bruder", "Brüder", "m"), ("Küche", "Küchen", "f"),
    ("Brücke", "Brücken", "f"), ("Lampe", "Lampen", "f"), ("Buch", "Bücher", "n"), ("Ball", "Bälle", "m"),
    ("Tisch", "Tische", "m"),
)  # fmt: skip
DE_ADJECTIVES: tuple[str, ...] = (
    "rot", "grün", "schwarz", "weiß", "groß", "klein", "alt", "neu", "laut", "leise", "sauber", "rund",
)  # fmt: skip
# (plural/infinitive, first person singular, second person singular, third person singular)
DE_TRANSITIVE_VERBS: tuple[tuple[str, str, str, str], ...] = (
    ("sehen", "sehe", "siehst", "sieht"), ("finden", "finde", "findest", "findet"),
    ("suchen", "suche", "suchst", "sucht"), ("kaufen", "kaufe", "kaufst", "kauft"),
    ("öffnen", "öffne", "öffnest", "öffnet"), ("tragen", "trage", "trägst", "trägt"),
    ("malen", "male", "malst", "malt"), ("bringen", "bringe", "bringst", "bringt"),
    ("nehmen", "nehme", "nimmst", "nimmt"), ("hören", "höre", "hörst", "hört"),
)  # fmt: skip
DE_INTRANSITIVE_VERBS: tuple[tuple[str, str, str, str], ...] = (
    ("schlafen", "schlafe", "schläfst", "schläft"), ("laufen", "laufe", "läufst", "läuft"),
    ("singen", "singe", "singst", "singt"), ("warten", "warte", "wartest", "wartet"),
    ("lachen", "lache", "lachst", "lacht"), ("spielen", "spiele", "spielst", "spielt"),
)  # fmt: skip
# pronoun -> index of the verb form it takes
DE_PRONOUNS: dict[str, int] = {"ich": 1, "du": 2, "er": 3, "sie": 3, "es": 3, "wir": 0}
DE_ADVERBS = ("heute", "morgen", "jetzt", "wieder", "oft", "bald")
DE_FRONT_ADVERBS = ("heute", "morgen", "jetzt", "bald")
DE_PREPOSITIONS = ("in", "neben", "hinter", "unter", "auf")

# Determiner forms by case and gender ("p" = plural). "der" words take weak adjective endings, "ein" words mixed.
DE_DEFINITE = {
    "nom": {"m": "der", "f": "die", "n": "das", "p": "die"},
    "acc": {"m": "den", "f": "die", "n": "das", "p": "die"},
    "dat": {"m": "dem", "f": "der", "n": "dem", "p": "den"},
}
DE_THIS = {
    "nom": {"m": "dieser", "f": "diese", "n": "dieses", "p": "diese"},
    "acc": {"m": "diesen", "f": "diese", "n": "dieses", "p": "diese"},
    "dat": {"m": "diesem", "f": "dieser", "n": "diesem", "p": "diesen"},
}
# ein-word endings appended to a stem (ein, mein, dein, unser, kein).
DE_EIN_ENDINGS = {
    "nom": {"m": "", "f": "e", "n": "", "p": "e"},
    "acc": {"m": "en", "f": "e", "n": "", "p": "e"},
    "dat": {"m": "em", "f": "er", "n": "em", "p": "en"},
}
DE_WEAK_ADJECTIVE_ENDINGS = {
    "nom": {"m": "e", "f": "e", "n": "e", "p": "en"},
    "acc": {"m": "en", "f": "e", "n": "e", "p": "en"},
    "dat": {"m": "en", "f": "en", "n": "en", "p": "en"},
}
DE_MIXED_ADJECTIVE_ENDINGS = {
    "nom": {"m": "er", "f": "e", "n": "es", "p": "en"},
    "acc": {"m": "en", "f": "e", "n": "es", "p": "en"},
    "dat": {"m": "en", "f": "en", "n": "en", "p": "en"},
}
DE_STRONG_PLURAL_ADJECTIVE_ENDINGS = {"nom": "e", "acc": "e"}


def _german_adjective(stem: str, ending: str) -> str:
    # Stems ending in -e (leise, müde) do not double it.
    return stem + (ending[1:] if stem.endswith("e") and ending.startswith("e") else ending)


def _german_noun_phrase(
    rng: np.random.Generator, case: str, plural: bool, adjective_p: float = 0.5, numbers: bool = True
) -> list[str]:
    singular, plural_form, gender = _pick(rng, DE_NOUNS)
    slot = "p" if plural else gender
    adjective = _pick(rng, DE_ADJECTIVES) if _chance(rng, adjective_p) else None
    roll = rng.random()
    if plural and numbers and roll < 0.4:
        determiner = str(_pick(rng, NUMBERS))
        endings: Any = DE_STRONG_PLURAL_ADJECTIVE_ENDINGS[case]
    elif roll < 0.7:
        determiner = (DE_DEFINITE if _chance(rng, 0.75) else DE_THIS)[case][slot]
        endings = DE_WEAK_ADJECTIVE_ENDINGS[case][slot]
    else:
        stems = ("mein", "dein", "unser") if plural else ("ein", "ein", "mein", "dein", "unser")
        determiner = _pick(rng, stems) + DE_EIN_ENDINGS[case][slot]
        endings = (DE_WEAK_ADJECTIVE_ENDINGS if plural else DE_MIXED_ADJECTIVE_ENDINGS)[case][slot]
    words = [determiner]
    if adjective is not None:
        words.append(_german_adjective(adjective, endings))
    words.append(plural_form if plural else singular)
    return words


def _german_place(rng: np.random.Generator) -> list[str]:
    preposition = _pick(rng, DE_PREPOSITIONS)
    words = _german_noun_phrase(rng, "dat", plural=False, adjective_p=0.3, numbers=False)
    if preposition == "in" and words[0] == "dem":
        return ["im", *words[1:]]
    return [preposition, *words]


def _german_subject(rng: np.random.Generator) -> tuple[list[str], int]:
    """(words, index of the verb form they take)."""
    if _chance(rng, 0.35):
        pronoun = _pick(rng, tuple(DE_PRONOUNS))
        return [pronoun], DE_PRONOUNS[pronoun]
    plural = _chance(rng, 0.35)
    return _german_noun_phrase(rng, "nom", plural), 0 if plural else 3


def german_sentence(rng: np.random.Generator) -> list[str]:
    """Words of one German sentence in verb-second order (no punctuation, sentence case applied later)."""
    roll = rng.random()
    if roll < 0.15:
        number = str(_pick(rng, NUMBERS))
        adjective = [_german_adjective(_pick(rng, DE_ADJECTIVES), "e")] if _chance(rng, 0.5) else []
        return ["es", "gibt", number, *adjective, _pick(rng, DE_NOUNS)[1], *_german_place(rng)]
    subject, form = _german_subject(rng)
    if roll < 0.4:
        verb = _pick(rng, DE_INTRANSITIVE_VERBS)[form]
        rest = _german_place(rng) if _chance(rng, 0.6) else []
    else:
        verb = _pick(rng, DE_TRANSITIVE_VERBS)[form]
        rest = _german_noun_phrase(rng, "acc", _chance(rng, 0.4))
        if _chance(rng, 0.35):
            rest += _german_place(rng)
    if _chance(rng, 0.15):
        return [_pick(rng, DE_FRONT_ADVERBS), verb, *subject, *rest]
    words = [*subject, verb, *rest]
    if _chance(rng, 0.3):
        words.append(_pick(rng, DE_ADVERBS))
    return words


def german_phrase(rng: np.random.Generator) -> list[str]:
    """One to three words: a noun phrase, a counted noun or a pronoun with a verb."""
    roll = rng.random()
    if roll < 0.2:
        return [_pick(rng, DE_NOUNS)[int(_chance(rng, 0.5))]]
    if roll < 0.5:
        return _german_noun_phrase(rng, "nom", _chance(rng, 0.4), numbers=False)
    if roll < 0.75:
        adjective = [_german_adjective(_pick(rng, DE_ADJECTIVES), "e")] if _chance(rng, 0.4) else []
        return [str(_pick(rng, NUMBERS)), *adjective, _pick(rng, DE_NOUNS)[1]]
    pronoun = _pick(rng, tuple(DE_PRONOUNS))
    return [pronoun, _pick(rng, (*DE_INTRANSITIVE_VERBS, *DE_TRANSITIVE_VERBS))[DE_PRONOUNS[pronoun]]]


@dataclasses.dataclass(frozen=True)
class LanguageSpec:
    name: str
    code: str
    sentence: Callable[[np.random.Generator], list[str]]
    phrase: Callable[[np.random.Generator], list[str]]


LANGUAGES: dict[str, LanguageSpec] = {
    "English": LanguageSpec("English", "en", english_sentence, english_phrase),
    "German": LanguageSpec("German", "de", german_sentence, german_phrase),
}


def sentence_text(words: Sequence[str]) -> str:
    """The transcript: first letter upper-cased, a full stop at the end."""
    text = " ".join(words)
    return text[:1].upper() + text[1:] + "."


def sentence_split(language: str, text: str) -> str:
    """The split a sentence belongs to, from a hash of its text: 5% test, 5% validation, 90% train."""
    bucket = int.from_bytes(hashlib.sha256(f"{language}\n{text}".encode()).digest()[:4], "big") % 100
    if bucket < 5:
        return "test"
    if bucket < 10:
        return "val"
    return "train"


def vocabulary(language: str) -> set[str]:
    """Every word form the grammar of ``language`` can produce (for tokenizer training and checks)."""
    if language == "English":
        words = {w for pair in EN_NOUNS for w in pair} | set(EN_ADJECTIVES)
        words |= {w for pair in (*EN_TRANSITIVE_VERBS, *EN_INTRANSITIVE_VERBS) for w in pair}
        words |= {
            *EN_SINGULAR_PRONOUNS,
            *EN_PLURAL_PRONOUNS,
            *EN_SINGULAR_DETERMINERS,
            *EN_PLURAL_DETERMINERS,
        }
        words |= {*EN_PREPOSITIONS, *EN_ADVERBS, "an", "there", "are"}
    elif language == "German":
        words = {w for noun in DE_NOUNS for w in noun[:2]}
        for stem in DE_ADJECTIVES:
            words |= {_german_adjective(stem, e) for e in ("e", "en", "er", "es")}
        words |= {w for verb in (*DE_TRANSITIVE_VERBS, *DE_INTRANSITIVE_VERBS) for w in verb}
        words |= {*DE_PRONOUNS, *DE_ADVERBS, *DE_PREPOSITIONS, "im", "es", "gibt"}
        for table in (DE_DEFINITE, DE_THIS):
            words |= {w for forms in table.values() for w in forms.values()}
        words |= {
            s + e
            for s in ("ein", "mein", "dein", "unser")
            for f in DE_EIN_ENDINGS.values()
            for e in f.values()
        }
    else:
        raise ValueError(f"unknown language {language!r}")
    return words | {str(n) for n in NUMBERS}


# --------------------------------------------------------------------------------------------------------------
# espeak-ng, in process


class Espeak:
    """libespeak-ng synthesising one text at a time into int16 samples at its native rate (22.05 kHz)."""

    _SYNCHRONOUS = 2  # AUDIO_OUTPUT_SYNCHRONOUS: espeak_Synth returns when the callback has had all samples
    _RATE, _PITCH, _RANGE = 1, 3, 4  # espeak_PARAMETER
    _CHARS_UTF8 = 1

    def __init__(self) -> None:
        self._lib = ctypes.CDLL("libespeak-ng.so.1")
        self._lib.espeak_Synth.argtypes = [
            ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint, ctypes.c_uint,
            ctypes.c_void_p, ctypes.c_void_p,
        ]  # fmt: skip
        self._lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        self.sample_rate = int(self._lib.espeak_Initialize(self._SYNCHRONOUS, 0, None, 0))
        if self.sample_rate <= 0:
            raise RuntimeError("espeak-ng failed to initialise")
        self._pieces: list[np.ndarray] = []
        callback_type = ctypes.CFUNCTYPE(
            ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
        )
        self._callback = callback_type(self._collect)  # kept alive as long as the library may call it
        self._lib.espeak_SetSynthCallback(self._callback)

    def _collect(self, samples: Any, count: int, events: Any) -> int:
        if samples and count > 0:
            self._pieces.append(np.ctypeslib.as_array(samples, shape=(count,)).copy())
        return 0

    def synth(self, text: str, voice: str, rate: int, pitch: int, pitch_range: int) -> np.ndarray:
        """float32 samples in [-1, 1] speaking ``text`` with ``voice`` (e.g. ``"en-us+m3"``)."""
        if self._lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise ValueError(f"espeak-ng has no voice {voice!r}")
        for parameter, value in ((self._RATE, rate), (self._PITCH, pitch), (self._RANGE, pitch_range)):
            self._lib.espeak_SetParameter(parameter, int(value), 0)
        self._pieces = []
        # The library keeps one callback per process: claim it, in case another instance took it since.
        self._lib.espeak_SetSynthCallback(self._callback)
        data = text.encode() + b"\0"
        self._lib.espeak_Synth(data, len(data), 0, 1, 0, self._CHARS_UTF8, None, None)
        if not self._pieces:
            return np.zeros(0, np.float32)
        return np.concatenate(self._pieces).astype(np.float32) / 32768.0


def voiced_extent(samples: np.ndarray, relative_threshold: float = 2e-3) -> tuple[int, int]:
    """[first, last + 1) of the samples above ``relative_threshold`` × peak.

    espeak-ng writes exact zeros around a word, so a low threshold finds where it starts and stops voicing.
    """
    loud = np.flatnonzero(np.abs(samples) > relative_threshold * float(np.abs(samples).max(initial=0.0)))
    if loud.size == 0:
        return 0, 0
    return int(loud[0]), int(loud[-1]) + 1


# --------------------------------------------------------------------------------------------------------------
# Utterances


@dataclasses.dataclass(frozen=True)
class UtterancePlan:
    """Everything that decides one utterance; rendering it is deterministic."""

    id: str
    language: str
    words: tuple[str, ...]
    voice: str
    rate: int
    pitch: int
    pitch_range: int
    seed: int
    # True: the whole sentence in one espeak-ng call (continuous speech, word times unknown); False: words
    # voiced one by one and joined with pauses (exact word times).
    continuous: bool = False
    # The words as the grammar writes them mid-sentence (no sentence case, no punctuation): the CTC labels.
    ctc_words: tuple[str, ...] = ()

    @property
    def text(self) -> str:
        return sentence_text(self.words)

    @property
    def ctc_text(self) -> str:
        return " ".join(self.ctc_words or self.words)


def plan_split(
    split: str,
    count: int,
    seed: int,
    languages: Sequence[str],
    short_fraction: float = 0.0,
    continuous: bool = False,
    variants: Sequence[str] | None = None,
) -> list[UtterancePlan]:
    """``count`` utterances of ``split``, languages taking turns, texts unique within the split.

    ``short_fraction`` of them are short phrases (one to three words) rather than sentences: in training they
    let the model learn what single words sound like before it has learnt to find them in a sentence.
    ``continuous`` plans sentences spoken in one go (ids ``<split>c-…``, drawn from their own random stream, so
    the word-by-word sets stay as they are).
    ``variants``: the voice variants to draw from instead of the split's own (``VARIANTS[split]``), e.g. the
    variants left out of every split, for a domain of voices the demo model never heard.
    """
    variants = VARIANTS[split] if variants is None else tuple(variants)
    rng = np.random.default_rng([seed, SPLITS.index(split), *([1] if continuous else [])])
    prefix = f"{split}c" if continuous else split
    seen: set[str] = set()
    plans = []
    for index in range(count):
        language = languages[index % len(languages)]
        spec = LANGUAGES[language]
        # Drawn only when asked for, so sets without phrases are the same as before phrases existed.
        make = spec.phrase if short_fraction > 0 and rng.random() < short_fraction else spec.sentence
        while True:
            words = make(rng)
            text = sentence_text(words)
            if len(words) <= MAX_WORDS and sentence_split(language, text) == split and text not in seen:
                break
        seen.add(text)
        voice = f"{_pick(rng, ACCENTS[language])}+{_pick(rng, variants)}"
        plans.append(
            UtterancePlan(
                id=f"{prefix}-{spec.code}-{index:05d}",
                language=language,
                words=tuple(text[:-1].split(" ")),  # sentence case applied to the first word
                voice=voice,
                rate=int(rng.integers(*RATE_RANGE, endpoint=True)),
                pitch=int(rng.integers(*PITCH_RANGE, endpoint=True)),
                pitch_range=int(rng.integers(*PITCH_SPREAD_RANGE, endpoint=True)),
                seed=int(rng.integers(2**31)),
                continuous=continuous,
                ctc_words=tuple(words),
            )
        )
    return plans


NOISE_KINDS = ("white", "pink", "brown", "hum")


def noise(kind: str, length: int, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    """Unit-RMS noise of ``kind``: white, pink (1/f power), brown (1/f²) or mains hum with harmonics."""
    if kind == "hum":
        t = np.arange(length) / sample_rate
        mains = _pick(rng, (50.0, 60.0))
        signal = sum(
            rng.uniform(0.2, 1.0) / h * np.sin(2 * np.pi * mains * h * t + rng.uniform(0, 2 * np.pi))
            for h in range(1, 6)
        )
        signal = signal + 0.05 * rng.standard_normal(length)
    else:
        spectrum = np.fft.rfft(rng.standard_normal(length))
        freqs = np.fft.rfftfreq(length, 1.0 / sample_rate)
        exponent = {"white": 0.0, "pink": 0.5, "brown": 1.0}[kind]
        spectrum[1:] /= np.maximum(freqs[1:], 20.0) ** exponent
        spectrum[0] = 0.0
        signal = np.fft.irfft(spectrum, n=length)
    return (signal / max(float(np.sqrt(np.mean(signal**2))), 1e-12)).astype(np.float32)


@dataclasses.dataclass
class Utterance:
    audio: np.ndarray  # [time] float32 at SAMPLE_RATE
    word_times: list[tuple[str, float, float]]
    noise_kind: str | None
    snr_db: float | None


def aligner_word(word: str) -> str:
    """The word as the aligner sees it: letters, digits and apostrophes only."""
    return "".join(c for c in word if c.isalnum() or c == "'")


def render(plan: UtterancePlan, espeak: Espeak) -> Utterance:
    """Synthesise ``plan``: words voiced one by one, joined with pauses, silence and noise around them."""
    rng = np.random.default_rng(plan.seed)
    native = espeak.sample_rate
    pieces: list[np.ndarray] = []
    word_times: list[tuple[str, float, float]] = []
    cursor = 0

    def pause(low: float, high: float) -> None:
        nonlocal cursor
        n = round(rng.uniform(low, high) * native)
        pieces.append(np.zeros(n, np.float32))
        cursor += n

    pause(0.05, 0.5)
    if plan.continuous:
        samples = espeak.synth(plan.text, plan.voice, plan.rate, plan.pitch, plan.pitch_range)
        first, end = voiced_extent(samples)
        if end <= first:
            raise RuntimeError(f"espeak-ng produced no sound for {plan.text!r} with voice {plan.voice}")
        pieces.append(samples[first:end])
        # One span for the whole voiced sentence: it only serves to measure the speech level below.
        word_times.append(("", cursor / native, (cursor + end - first) / native))
        cursor += end - first
    for position, word in enumerate(() if plan.continuous else plan.words):
        if position:
            # Mostly short gaps, sometimes a hesitation.
            if _chance(rng, 0.1):
                pause(0.35, 0.8)
            else:
                pause(0.03, 0.3)
        samples = espeak.synth(word, plan.voice, plan.rate, plan.pitch, plan.pitch_range)
        first, end = voiced_extent(samples)
        if end <= first:
            raise RuntimeError(f"espeak-ng produced no sound for {word!r} with voice {plan.voice}")
        pieces.append(samples[first:end])
        word_times.append((aligner_word(word), cursor / native, (cursor + end - first) / native))
        cursor += end - first
    pause(0.05, 0.5)

    speech = soxr.resample(np.concatenate(pieces), native, SAMPLE_RATE).astype(np.float32)
    voiced = np.concatenate([speech[int(s * SAMPLE_RATE) : int(e * SAMPLE_RATE)] for _, s, e in word_times])
    speech_rms = float(np.sqrt(np.mean(voiced**2)))
    noise_kind, snr_db = None, None
    if _chance(rng, 0.7):
        noise_kind = _pick(rng, NOISE_KINDS)
        snr_db = float(rng.uniform(15.0, 40.0))
        level = speech_rms / 10 ** (snr_db / 20)
        speech = speech + level * noise(noise_kind, len(speech), SAMPLE_RATE, rng)
    speech *= rng.uniform(0.25, 0.95) / max(float(np.abs(speech).max()), 1e-6)
    if plan.continuous:
        word_times = []
    return Utterance(speech.astype(np.float32), word_times, noise_kind, snr_db)


_WORKER_ESPEAK: Espeak | None = None


def _render_row(plan: UtterancePlan, out_dir: str, split: str) -> dict[str, Any]:
    global _WORKER_ESPEAK
    if _WORKER_ESPEAK is None:
        _WORKER_ESPEAK = Espeak()
    utterance = render(plan, _WORKER_ESPEAK)
    relative = f"{split}/{plan.id}.flac"
    soundfile.write(os.path.join(out_dir, relative), utterance.audio, SAMPLE_RATE, subtype="PCM_16")
    return {
        "id": plan.id,
        "audio": relative,
        "text": plan.text,
        "ctc_text": plan.ctc_text,
        "language": plan.language,
        "duration": round(len(utterance.audio) / SAMPLE_RATE, 4),
        "voice": plan.voice,
        "rate": plan.rate,
        "pitch": plan.pitch,
        "noise": utterance.noise_kind,
        "snr_db": None if utterance.snr_db is None else round(utterance.snr_db, 1),
        "continuous": plan.continuous,
        "words": [{"text": w, "start": round(s, 4), "end": round(e, 4)} for w, s, e in utterance.word_times],
    }


def plan_words(count: int, seed: int, languages: Sequence[str]) -> list[UtterancePlan]:
    """``count`` single-word utterances in training voices, going through every word form of each language in
    turn: for a first training stage where the model learns what each word sounds like on its own (a test
    sentence always has two or more words, so none of these texts is a test text)."""
    rng = np.random.default_rng([seed, len(SPLITS)])
    forms = {language: sorted(vocabulary(language)) for language in languages}
    plans = []
    for index in range(count):
        language = languages[index % len(languages)]
        words = forms[language]
        word = words[(index // len(languages)) % len(words)]
        text = sentence_text([word])
        plans.append(
            UtterancePlan(
                id=f"words-{LANGUAGES[language].code}-{index:05d}",
                language=language,
                words=(text[:-1],),
                ctc_words=(word,),
                voice=f"{_pick(rng, ACCENTS[language])}+{_pick(rng, VARIANTS['train'])}",
                rate=int(rng.integers(*RATE_RANGE, endpoint=True)),
                pitch=int(rng.integers(*PITCH_RANGE, endpoint=True)),
                pitch_range=int(rng.integers(*PITCH_SPREAD_RANGE, endpoint=True)),
                seed=int(rng.integers(2**31)),
            )
        )
    return plans


def write_manifest(
    out_dir: str | os.PathLike, name: str, plans: Sequence[UtterancePlan], workers: int = 1
) -> Path:
    """Render ``plans`` into ``<out_dir>/<name>/`` and write ``<out_dir>/<name>.jsonl``."""
    out = Path(out_dir)
    (out / name).mkdir(parents=True, exist_ok=True)
    manifest = out / f"{name}.jsonl"
    tmp = manifest.with_suffix(".jsonl.tmp")
    args = (plans, [os.fspath(out)] * len(plans), [name] * len(plans))
    with open(tmp, "w", encoding="utf-8") as f:
        if workers <= 1:
            rows = map(_render_row, *args)
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        else:
            with concurrent.futures.ProcessPoolExecutor(workers) as pool:
                for row in pool.map(_render_row, *args, chunksize=16):
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, manifest)
    return manifest


def write_split(
    out_dir: str | os.PathLike,
    split: str,
    count: int,
    *,
    seed: int,
    languages: Sequence[str],
    workers: int = 1,
    short_fraction: float = 0.0,
    continuous: bool = False,
    variants: Sequence[str] | None = None,
) -> Path:
    """Render ``count`` utterances of ``split`` into ``out_dir`` and write ``<out_dir>/<split>.jsonl``
    (``<split>_continuous.jsonl`` for sentences spoken in one go)."""
    plans = plan_split(split, count, seed, languages, short_fraction, continuous, variants)
    return write_manifest(out_dir, f"{split}_continuous" if continuous else split, plans, workers)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m train.synth",
        description="Generate espeak-ng speech with exact word times as train/val/test JSONL manifests.",
    )
    parser.add_argument("--out", required=True, help="output directory (manifests and audio folders)")
    parser.add_argument("--train", type=int, default=4000, help="train utterances (default 4000)")
    parser.add_argument("--val", type=int, default=200, help="validation utterances (default 200)")
    parser.add_argument("--test", type=int, default=400, help="test utterances (default 400)")
    parser.add_argument(
        "--words",
        type=int,
        default=0,
        help="also write words.jsonl: this many single-word utterances in training voices (default 0)",
    )
    for split in SPLITS:
        parser.add_argument(
            f"--{split}-continuous",
            type=int,
            default=0,
            help=f"also write {split}_continuous.jsonl: this many {split} sentences spoken in one go (default 0)",
        )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--languages", default="English,German", help="comma-separated languages (default English,German)"
    )
    parser.add_argument(
        "--short-fraction",
        type=float,
        default=0.3,
        help="share of training utterances that are 1-3 word phrases (default 0.3; val and test have none)",
    )
    parser.add_argument("--workers", type=int, default=1, help="parallel synthesis processes (default 1)")
    parser.add_argument(
        "--voices",
        help="comma-separated voice variants for every split instead of each split's own, e.g. variants of no "
        f"split for a domain the demo model never heard ({', '.join(UNHEARD_VARIANTS)})",
    )
    args = parser.parse_args(argv)
    languages = [name.strip() for name in args.languages.split(",") if name.strip()]
    unknown = [name for name in languages if name not in LANGUAGES]
    if unknown or not languages:
        parser.error(f"--languages: choose from {', '.join(LANGUAGES)} (got {args.languages!r})")
    variants = None
    if args.voices is not None:
        variants = [name.strip() for name in args.voices.split(",") if name.strip()]
        known = {*UNHEARD_VARIANTS, *(v for names in VARIANTS.values() for v in names)}
        # espeak-ng falls back to the plain voice for a variant it does not have, so unknown names are refused here.
        unknown = [name for name in variants if name not in known]
        if unknown or not variants:
            parser.error(f"--voices: unknown voice variants {unknown} (known: {', '.join(sorted(known))})")
    for split, continuous in [(split, c) for c in (False, True) for split in SPLITS]:
        count = getattr(args, f"{split}_continuous" if continuous else split)
        if count <= 0:
            continue
        started = time.monotonic()
        manifest = write_split(
            args.out,
            split,
            count,
            seed=args.seed,
            languages=languages,
            workers=args.workers,
            short_fraction=args.short_fraction if split == "train" else 0.0,
            continuous=continuous,
            variants=variants,
        )
        print(
            f"{manifest.stem}: {count} utterances -> {manifest} ({time.monotonic() - started:.1f} s)",
            file=sys.stderr,
        )
    if args.words > 0:
        started = time.monotonic()
        manifest = write_manifest(
            args.out, "words", plan_words(args.words, args.seed, languages), args.workers
        )
        print(
            f"words: {args.words} utterances -> {manifest} ({time.monotonic() - started:.1f} s)",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
