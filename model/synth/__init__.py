"""SynthTalk: a synthetic talking-head world with ground truth (DESIGN 4). See docs/synthtalk.md."""

from model.synth.articulation import mouth_track, shift_phones
from model.synth.face import Framing, Identity, idle_motion, render, render_portrait
from model.synth.phones import PHONES, PhoneTiming
from model.synth.speech import Speaker, Speech, formant_speech
from model.synth.world import (
    FPS,
    RENDER_VERSION,
    Clip,
    SpeechKind,
    load_truth_phones,
    make_clip,
    write_clip,
    write_dataset,
)

__all__ = [
    "PHONES",
    "PhoneTiming",
    "Speaker",
    "Speech",
    "formant_speech",
    "Framing",
    "Identity",
    "idle_motion",
    "render",
    "render_portrait",
    "mouth_track",
    "shift_phones",
    "FPS",
    "RENDER_VERSION",
    "Clip",
    "SpeechKind",
    "make_clip",
    "write_clip",
    "write_dataset",
    "load_truth_phones",
]
