"""Real phonetic speech from espeak-ng (the shared library and voice data shipped in `espeakng-loader`).

espeak-ng is driven through ctypes in synchronous mode: it hands back 22.05 kHz samples and one event per
phoneme with its sample position. Its phoneme mnemonics are mapped onto the SynthTalk inventory
(`phones.py`), diphthongs split in two halves, so the same faces can be driven by real speech.

The library is not a pure function of its input: it draws noise from the C library's `rand()` and keeps state from
one utterance to the next (the same sentence spoken twice in a process differs by up to 0.8 of full scale, and by a
few samples in length, and its phone timings move: a 4-s clip made twice in one process correlated 0.61 with
itself). `espeak_speech` therefore speaks each clip in a fresh process, seeding `rand()` before every utterance: the
same arguments give the same phone timings every time, and the same samples up to a residue the library keeps (in
some runs up to 0.05 of full scale, correlation 0.998 with the others; its source was not found).
"""

from __future__ import annotations

import ctypes
import functools
import multiprocessing
import threading

import numpy as np
from scipy import signal

from model.synth.phones import PAUSE, PHONES, PhoneTiming
from model.synth.speech import SAMPLE_RATE, Speech

_SPEAKER_STREAM = 20
_TEXT_STREAM = 21
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_PHONEME_EVENTS = 1
_EVENT_LIST_TERMINATED = 0
_EVENT_PHONEME = 7
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_PARAM_RATE, _PARAM_PITCH, _PARAM_RANGE = 1, 3, 4
RAND_SEED = 1  # of the C library's rand(), before every utterance
_VOICES = ("en", "en+m1", "en+m3", "en+m5", "en+f1", "en+f2", "en+f3", "en+f4")
_SENTENCE_GAP = (0.15, 0.45)  # seconds of silence between sentences

SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "Please call me back when you have a moment.",
    "We will open the new shop on Monday morning.",
    "A cup of warm tea is all I need today.",
    "She sells sea shells by the sea shore.",
    "The weather was cold but the sky was blue.",
    "Turn left at the bridge and keep going.",
    "My brother reads a book every week.",
    "Nobody knew where the old map was hidden.",
    "Good morning, and welcome to the evening news.",
    "They played music until the sun went down.",
    "How much does the ticket to the museum cost?",
    "I would like to thank you all for coming.",
    "The children ran across the garden laughing.",
    "Open the window, it is getting warm in here.",
    "Every story has a beginning and an end.",
    "Bring your boots, the path will be muddy.",
    "Our team finished the project ahead of time.",
    "Yellow leaves were falling from the trees.",
    "Can you hear the birds singing outside?",
)

# espeak-ng's English phoneme mnemonics (stress marks stripped) -> SynthTalk phones.
_ESPEAK_TO_PHONES: dict[str, tuple[str, ...]] = {
    "a": ("ae",),
    "a#": ("a",),
    "A:": ("a",),
    "A@": ("a",),
    "aa": ("a",),
    "A": ("a",),
    "V": ("a",),
    "@": ("e",),
    "@2": ("e",),
    "@5": ("e",),
    "@L": ("e", "l"),
    "3": ("e",),
    "3:": ("e",),
    "E": ("e",),
    "e": ("e",),
    "e@": ("e", "e"),
    "I": ("i",),
    "I2": ("i",),
    "I#": ("i",),
    "i": ("i",),
    "i:": ("i",),
    "i@": ("i", "e"),
    "i@3": ("i", "e"),
    "0": ("o",),
    "O": ("o",),
    "O:": ("o",),
    "O@": ("o",),
    "o@": ("o",),
    "U": ("u",),
    "u:": ("u",),
    "u": ("u",),
    "U@": ("u", "e"),
    "aI": ("a", "i"),
    "aU": ("a", "u"),
    "eI": ("e", "i"),
    "oU": ("o", "u"),
    "OI": ("o", "i"),
    "aI@": ("a", "e"),
    "p": ("p",),
    "b": ("b",),
    "t": ("t",),
    "d": ("d",),
    "k": ("k",),
    "g": ("g",),
    "t#": ("t",),
    "?": ("t",),
    "m": ("m",),
    "n": ("n",),
    "N": ("n",),
    "l": ("l",),
    "r": ("l",),
    "r-": ("l",),
    "w": ("u",),
    "j": ("i",),
    "f": ("f",),
    "v": ("f",),
    "T": ("t",),
    "D": ("t",),
    "s": ("s",),
    "z": ("s",),
    "S": ("sh",),
    "Z": ("sh",),
    "tS": ("sh",),
    "dZ": ("sh",),
    "h": ("h",),
}


def map_phoneme(mnemonic: str) -> tuple[str, ...]:
    """SynthTalk phones for one espeak-ng mnemonic; pauses and unknown symbols degrade gracefully."""
    name = mnemonic.strip().lstrip("',%=")
    if not name or name.startswith("_") or name == ";":
        return (PAUSE,)
    if name in _ESPEAK_TO_PHONES:
        return _ESPEAK_TO_PHONES[name]
    if name[:2] in _ESPEAK_TO_PHONES:
        return _ESPEAK_TO_PHONES[name[:2]]
    return _ESPEAK_TO_PHONES.get(name[0], ("e",) if name[0].lower() in "aeiou@03" else ("t",))


class _EventId(ctypes.Union):
    _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8)]


class _Event(ctypes.Structure):  # espeak_EVENT from speak_lib.h
    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),
        ("sample", ctypes.c_int),
        ("user_data", ctypes.c_void_p),
        ("id", _EventId),
    ]


_Callback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event))


class EspeakEngine:
    """One loaded espeak-ng. The C library keeps process-wide state, so calls are serialised by a lock."""

    def __init__(self):
        import espeakng_loader

        self._lib = ctypes.CDLL(espeakng_loader.get_library_path())
        self._libc = ctypes.CDLL(None)  # whose rand() espeak-ng calls
        self._lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        self._lib.espeak_Synth.argtypes = [
            ctypes.c_char_p,
            ctypes.c_size_t,
            ctypes.c_uint,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.c_void_p,
            ctypes.c_void_p,
        ]
        self._lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        data = espeakng_loader.get_data_path().encode()
        self.sample_rate = self._lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data, _INITIALIZE_PHONEME_EVENTS)
        if self.sample_rate <= 0:
            raise RuntimeError(f"espeak-ng failed to initialise (data at {data.decode()})")
        self._chunks: list[bytes] = []
        self._events: list[tuple[str, int]] = []
        self._callback = _Callback(self._on_audio)  # kept referenced: espeak calls it from C
        self._lib.espeak_SetSynthCallback(self._callback)
        self._lock = threading.Lock()

    def _on_audio(self, wav, num_samples, events) -> int:
        if wav and num_samples > 0:
            self._chunks.append(ctypes.string_at(wav, num_samples * 2))
        i = 0
        while events[i].type != _EVENT_LIST_TERMINATED:
            if events[i].type == _EVENT_PHONEME:
                self._events.append((events[i].id.string.decode("ascii", "replace"), events[i].sample))
            i += 1
        return 0  # continue synthesis

    def speak(self, text: str, voice: str = "en", rate_wpm: int = 160, pitch: int = 50, pitch_range: int = 50):
        """Samples (float32 at `self.sample_rate`) and [(mnemonic, start sample)] for one sentence."""
        with self._lock:
            self._libc.srand(RAND_SEED)  # the noise espeak-ng draws for this utterance (setting the voice draws too)
            self._chunks, self._events = [], []
            if self._lib.espeak_SetVoiceByName(voice.encode()) != 0:
                raise ValueError(f"espeak-ng has no voice {voice!r}")
            self._lib.espeak_SetParameter(_PARAM_RATE, rate_wpm, 0)
            self._lib.espeak_SetParameter(_PARAM_PITCH, pitch, 0)
            self._lib.espeak_SetParameter(_PARAM_RANGE, pitch_range, 0)
            raw = text.encode("utf-8")
            err = self._lib.espeak_Synth(raw, len(raw) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
            if err != 0:
                raise RuntimeError(f"espeak_Synth failed with error {err}")
            self._lib.espeak_Synchronize()
            pcm = np.frombuffer(b"".join(self._chunks), dtype=np.int16).astype(np.float32) / 32768.0
            return pcm, list(self._events)


@functools.cache
def engine() -> EspeakEngine:
    """The process's espeak-ng (the library itself is process-wide; loading it twice gains nothing)."""
    return EspeakEngine()


def sentence_phones(
    events: list[tuple[str, int]], num_samples: int, sample_rate: int, offset: float
) -> list[PhoneTiming]:
    """Phoneme events (mnemonic, start sample) -> timings; a diphthong's span is split evenly."""
    timings: list[PhoneTiming] = []
    starts = [s for _, s in events] + [num_samples]
    for (mnemonic, start), end in zip(events, starts[1:]):
        if end <= start:
            continue
        parts = map_phoneme(mnemonic)
        step = (end - start) / len(parts)
        for j, phone in enumerate(parts):
            t0 = offset + (start + j * step) / sample_rate
            timings.append(PhoneTiming(phone, t0, t0 + step / sample_rate))
    return timings


def espeak_speech(seed: int, seconds: float, sample_rate: int = SAMPLE_RATE, speaker_seed: int | None = None) -> Speech:
    """Sentences spoken by espeak-ng filling exactly `seconds`: `seed` picks the text, `speaker_seed` the voice. Spoken
    in a fresh process, so the result does not depend on what was spoken before (the module docstring says why)."""
    if multiprocessing.current_process().daemon:  # may not start processes (a DataLoader's worker): spoken here
        return _speak_clip(seed, seconds, sample_rate, speaker_seed)
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_speak_clip, (seed, seconds, sample_rate, speaker_seed))


def _speak_clip(seed: int, seconds: float, sample_rate: int, speaker_seed: int | None) -> Speech:
    voice_rng = np.random.default_rng([seed if speaker_seed is None else speaker_seed, _SPEAKER_STREAM])
    voice = str(voice_rng.choice(_VOICES))
    rate_wpm, pitch, pitch_range = (
        int(voice_rng.integers(130, 190)),
        int(voice_rng.integers(30, 70)),
        int(voice_rng.integers(30, 80)),
    )
    text_rng = np.random.default_rng([seed, _TEXT_STREAM])
    tts = engine()

    pieces: list[np.ndarray] = []
    timings: list[PhoneTiming] = []
    t = 0.0
    while t < seconds:
        gap = float(text_rng.uniform(*_SENTENCE_GAP))
        pieces.append(np.zeros(int(round(gap * sample_rate)), dtype=np.float32))
        timings.append(PhoneTiming(PAUSE, t, t + gap))
        t += gap
        raw, events = tts.speak(str(text_rng.choice(SENTENCES)), voice, rate_wpm, pitch, pitch_range)
        timings += sentence_phones(events, len(raw), tts.sample_rate, t)
        audio = signal.resample_poly(raw, sample_rate, tts.sample_rate).astype(np.float32)
        pieces.append(audio)
        t += len(audio) / sample_rate  # keep the clock on the resampled audio so timings never drift

    samples = np.concatenate(pieces)[: int(round(seconds * sample_rate))]
    samples = np.pad(samples, (0, int(round(seconds * sample_rate)) - len(samples)))
    kept = [p for p in timings if p.start < seconds and p.phone in PHONES]
    kept[-1] = PhoneTiming(kept[-1].phone, kept[-1].start, min(kept[-1].end, seconds))
    return Speech(samples, sample_rate, kept)
