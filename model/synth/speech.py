"""Formant-synthesised speech-like audio from phone sequences, deterministic from seeds.

A glottal pulse train (pitch with a per-phrase declination and slow wobble) drives cascaded formant
resonators for vowels and nasals; fricatives are band-passed noise; plosives are a closure followed by a
short noise burst; pauses are silence. Each phone is synthesised with its own filter and cross-faded into
the track, which keeps it fast (no per-sample Python loop).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import signal

from model.synth.phones import CONSONANTS, PAUSE, PHONES, VOWELS, PhoneTiming

SAMPLE_RATE = 16000
_SPEAKER_STREAM = 1  # separates a speaker's random stream from an identity's with the same seed
_TEXT_STREAM = 2
_NOISE_STREAM = 3
_FORMANT_BANDWIDTHS = (80.0, 110.0, 160.0)  # Hz, F1..F3
_EDGE_SECONDS = 0.012  # raised-cosine fade at each phone's edges (no clicks)
_BURST_SECONDS = 0.018  # plosive release
_CLOSURE_FRACTION = 0.6  # part of a plosive that is silent closure
_NOISE_FLOOR = 1e-4


@dataclass(frozen=True)
class Speaker:
    """How one synthetic speaker talks."""

    pitch_hz: float  # mean f0
    pitch_range: float  # relative f0 swing of the slow contour
    declination: float  # relative f0 fall over a phrase
    formant_scale: float  # vocal-tract length: scales every formant
    rate: float  # speaking rate: durations are divided by it
    breathiness: float  # aspiration noise mixed into voicing
    loudness: float

    @classmethod
    def from_seed(cls, seed: int) -> Speaker:
        rng = np.random.default_rng([seed, _SPEAKER_STREAM])
        low_voice = rng.random() < 0.5
        return cls(
            pitch_hz=float(rng.uniform(85, 150) if low_voice else rng.uniform(160, 260)),
            pitch_range=float(rng.uniform(0.05, 0.2)),
            declination=float(rng.uniform(0.0, 0.2)),
            formant_scale=float(rng.uniform(0.88, 1.0) if low_voice else rng.uniform(1.0, 1.2)),
            rate=float(rng.uniform(0.8, 1.25)),
            breathiness=float(rng.uniform(0.01, 0.08)),
            loudness=float(rng.uniform(0.35, 0.6)),
        )


@dataclass(frozen=True)
class Speech:
    samples: np.ndarray  # float32 mono in [-1, 1]
    sample_rate: int
    phones: list[PhoneTiming]

    @property
    def seconds(self) -> float:
        return len(self.samples) / self.sample_rate


def random_phones(seed: int, seconds: float, speaker: Speaker) -> list[PhoneTiming]:
    """Phrases of CV/CVC syllables separated by pauses, filling `seconds` exactly."""
    rng = np.random.default_rng([seed, _TEXT_STREAM])
    timings: list[PhoneTiming] = []
    t = float(rng.uniform(0.1, 0.4))  # a short lead-in of silence
    if t > 0:
        timings.append(PhoneTiming(PAUSE, 0.0, t))

    def add(name: str, lo: float, hi: float) -> None:
        nonlocal t
        duration = float(rng.uniform(lo, hi)) / speaker.rate
        timings.append(PhoneTiming(name, t, t + duration))
        t += duration

    while t < seconds:
        for _ in range(int(rng.integers(2, 7))):  # syllables in a phrase
            if rng.random() < 0.8:
                add(str(rng.choice(CONSONANTS)), 0.05, 0.1)
            add(str(rng.choice(VOWELS)), 0.08, 0.2)
            if rng.random() < 0.3:
                add(str(rng.choice(CONSONANTS)), 0.05, 0.1)
        add(PAUSE, 0.15, 0.5)
    # Cut at `seconds`; the cut phone is shortened, later ones dropped.
    clipped = [p for p in timings if p.start < seconds]
    last = clipped[-1]
    clipped[-1] = PhoneTiming(last.phone, last.start, seconds)
    return clipped


def _resonator(freq: float, bandwidth: float, sample_rate: int) -> tuple[np.ndarray, np.ndarray]:
    """A 2-pole resonance with unit gain at DC (the Klatt synthesiser's resonator)."""
    r = np.exp(-np.pi * bandwidth / sample_rate)
    theta = 2 * np.pi * freq / sample_rate
    a = np.array([1.0, -2 * r * np.cos(theta), r * r])
    return np.array([a.sum()]), a


def _glottal_source(f0: np.ndarray, sample_rate: int) -> np.ndarray:
    """A band-limited-enough pulse train: a shaped sawtooth from the accumulated phase of f0."""
    phase = np.cumsum(f0 / sample_rate) % 1.0
    pulse = np.where(phase < 0.6, np.sin(np.pi * phase / 0.6) ** 2, 0.0)  # Rosenberg-like open phase
    return np.diff(pulse, prepend=0.0) * (sample_rate / f0.mean())  # radiated: derivative of flow


def _edge_envelope(n: int, sample_rate: int) -> np.ndarray:
    edge = min(int(_EDGE_SECONDS * sample_rate), n // 2)
    env = np.ones(n)
    if edge > 0:
        ramp = 0.5 - 0.5 * np.cos(np.linspace(0, np.pi, edge))
        env[:edge] = ramp
        env[n - edge :] = ramp[::-1]
    return env


def _bandpass(noise: np.ndarray, band: tuple[float, float], sample_rate: int) -> np.ndarray:
    nyquist = sample_rate / 2
    lo, hi = band[0] / nyquist, min(band[1] / nyquist, 0.95)
    sos = signal.butter(2, [lo, hi], btype="band", output="sos")
    return signal.sosfilt(sos, noise)


def synthesize(phones: list[PhoneTiming], speaker: Speaker, seed: int, sample_rate: int = SAMPLE_RATE) -> Speech:
    """Render phone timings to audio. The timings are the ground truth and are returned unchanged."""
    rng = np.random.default_rng([seed, _NOISE_STREAM])
    total = int(round(phones[-1].end * sample_rate))
    t = np.arange(total) / sample_rate

    # Pitch: mean, a slow random-phase wobble, and a fall over each phrase (reset at every pause).
    wobble = np.sin(2 * np.pi * 0.7 * t + rng.uniform(0, 2 * np.pi)) + 0.5 * np.sin(
        2 * np.pi * 1.9 * t + rng.uniform(0, 2 * np.pi)
    )
    phrase_start = np.zeros(total)
    for p in phones:
        if p.phone == PAUSE:
            phrase_start[int(p.end * sample_rate) :] = p.end
    since_phrase = t - phrase_start
    f0 = (
        speaker.pitch_hz
        * (1 + speaker.pitch_range * wobble / 1.5)
        * (1 - speaker.declination * np.tanh(since_phrase / 2))
    )
    voicing = _glottal_source(f0, sample_rate)
    voicing += speaker.breathiness * rng.standard_normal(total) * np.abs(voicing).mean() * 4
    noise = rng.standard_normal(total)

    out = np.zeros(total)
    for p in phones:
        s0, s1 = int(round(p.start * sample_rate)), int(round(p.end * sample_rate))
        n = s1 - s0
        if n <= 0:
            continue
        info = PHONES[p.phone]
        if info.kind in ("vowel", "nasal"):
            seg = voicing[s0:s1]
            for freq, bw in zip(info.formants, _FORMANT_BANDWIDTHS):
                b, a = _resonator(freq * speaker.formant_scale, bw, sample_rate)
                seg = signal.lfilter(b, a, seg)
            gain = 1.0 if info.kind == "vowel" else 0.35
            seg = gain * seg / (np.abs(seg).max() + 1e-9)
        elif info.kind == "fricative":
            seg = 0.25 * _bandpass(noise[s0:s1], info.noise_band, sample_rate)
        elif info.kind == "plosive":
            seg = np.zeros(n)
            closure = int(n * _CLOSURE_FRACTION)
            if info.voiced:  # a low murmur during the closure
                b, a = _resonator(200 * speaker.formant_scale, 100, sample_rate)
                murmur = signal.lfilter(b, a, voicing[s0 : s0 + closure])
                seg[:closure] = 0.1 * murmur / (np.abs(murmur).max() + 1e-9)
            burst_n = min(int(_BURST_SECONDS * sample_rate), n - closure)
            burst = _bandpass(noise[s0 + closure : s0 + closure + burst_n], info.noise_band, sample_rate)
            seg[closure : closure + burst_n] = 0.6 * burst * np.exp(-np.arange(burst_n) / (burst_n / 4 + 1))
        else:  # pause
            seg = np.zeros(n)
        out[s0:s1] += seg * _edge_envelope(n, sample_rate)

    out = speaker.loudness * out / (np.abs(out).max() + 1e-9)
    out += _NOISE_FLOOR * noise
    return Speech(out.astype(np.float32), sample_rate, list(phones))


def formant_speech(
    seed: int, seconds: float, sample_rate: int = SAMPLE_RATE, speaker_seed: int | None = None
) -> Speech:
    """Random speech-like audio of exactly `seconds`: `seed` picks the phones, `speaker_seed` the voice."""
    speaker = Speaker.from_seed(seed if speaker_seed is None else speaker_seed)
    return synthesize(random_phones(seed, seconds, speaker), speaker, seed, sample_rate)
