"""The phone inventory of SynthTalk: how each phone sounds and what the mouth does while it is spoken.

One table serves the formant synthesiser (`speech.py`), the espeak-ng mapping (`espeak.py`) and the
face (`articulation.py`), so audio and mouth can never disagree about a phone.

Mouth targets are in [0, 1]: `opening` (jaw/lip gap), `width` (lip spread), `rounding` (lip protrusion,
which also narrows the mouth). Formants are for an average adult speaker; a speaker scales them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

PhoneKind = Literal["vowel", "fricative", "plosive", "nasal", "pause"]


@dataclass(frozen=True)
class Phone:
    name: str
    kind: PhoneKind
    opening: float
    width: float
    rounding: float
    formants: tuple[float, ...] = ()  # Hz; vowels and nasals (resonances of the voiced source)
    noise_band: tuple[float, float] = (0.0, 0.0)  # Hz; fricative hiss or plosive burst band
    voiced: bool = False  # b/d/g murmur during the closure


# Vowel formants after Peterson & Barney's averages for adult speakers (F1, F2, F3).
PHONES: dict[str, Phone] = {
    p.name: p
    for p in (
        Phone("a", "vowel", 1.00, 0.60, 0.10, formants=(730, 1090, 2440)),
        Phone("ae", "vowel", 0.85, 0.85, 0.00, formants=(660, 1720, 2410)),
        Phone("e", "vowel", 0.60, 0.80, 0.00, formants=(530, 1840, 2480)),
        Phone("i", "vowel", 0.25, 1.00, 0.00, formants=(270, 2290, 3010)),
        Phone("o", "vowel", 0.65, 0.35, 0.80, formants=(570, 840, 2410)),
        Phone("u", "vowel", 0.30, 0.20, 1.00, formants=(300, 870, 2240)),
        Phone("s", "fricative", 0.10, 0.80, 0.00, noise_band=(4500, 7500)),
        Phone("sh", "fricative", 0.15, 0.40, 0.60, noise_band=(2200, 4500)),
        Phone("f", "fricative", 0.05, 0.50, 0.00, noise_band=(1000, 7000)),
        Phone("h", "fricative", 0.45, 0.55, 0.10, noise_band=(500, 3000)),
        Phone("p", "plosive", 0.00, 0.50, 0.10, noise_band=(500, 1500)),
        Phone("b", "plosive", 0.00, 0.50, 0.10, noise_band=(500, 1500), voiced=True),
        Phone("t", "plosive", 0.15, 0.60, 0.00, noise_band=(3000, 6000)),
        Phone("d", "plosive", 0.15, 0.60, 0.00, noise_band=(3000, 6000), voiced=True),
        Phone("k", "plosive", 0.30, 0.50, 0.10, noise_band=(1500, 3500)),
        Phone("g", "plosive", 0.30, 0.50, 0.10, noise_band=(1500, 3500), voiced=True),
        Phone("m", "nasal", 0.00, 0.50, 0.10, formants=(250, 1000, 2200)),
        Phone("n", "nasal", 0.15, 0.55, 0.00, formants=(250, 1700, 2500)),
        Phone("l", "nasal", 0.30, 0.55, 0.00, formants=(360, 1300, 2700)),
        Phone("_", "pause", 0.00, 0.50, 0.10),
    )
}

PAUSE = "_"
VOWELS = tuple(n for n, p in PHONES.items() if p.kind == "vowel")
CONSONANTS = tuple(n for n, p in PHONES.items() if p.kind not in ("vowel", "pause"))
REST = PHONES[PAUSE]  # the mouth at rest: closed, neutral width


@dataclass(frozen=True)
class PhoneTiming:
    """One spoken phone: its name in `PHONES` and its span in seconds."""

    phone: str
    start: float
    end: float

    def to_json(self) -> dict:
        return {"phone": self.phone, "start": round(self.start, 5), "end": round(self.end, 5)}

    @classmethod
    def from_json(cls, row: dict) -> PhoneTiming:
        return cls(str(row["phone"]), float(row["start"]), float(row["end"]))
