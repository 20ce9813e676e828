"""Full-length clips that look like AudioSet's to a codec, made offline (for size measurements).

Synthetic tones over white noise compress unrealistically well or badly; what decides a shard
encoding's size is how real log-mels vary: speech with pauses, music with notes and drums, noise
beds whose level drifts, short events, reverberation, band-limited uploads. Each clip is 10 s,
never padded, written as 16-bit FLAC (44.1 kHz stereo or 32/48 kHz mono), and is one of
(cycled, seeded):

- ``speech``: espeak-ng sentences (random voice, variant, speed and pitch; several languages) in
  a reverberant room over a pink/brown noise bed at 5-25 dB SNR;
- ``music``: chords of additive-synthesis notes with decaying harmonics and vibrato, a bass line,
  kick / snare / hi-hat drums, reverb;
- ``street``: a drifting brown + pink noise bed with passing cars (low-passed noise swells), a
  siren, horn blasts, footstep-like knocks and speech far away;
- ``nature``: wind (modulated brown noise), bird chirps (fast FM sweeps), dog-bark-like harmonic
  bursts, rain-like crackle;
- ``mixture``: speech over music over a noise bed (a vlog, a party);
- every fourth clip is band-limited to 8 or 11 kHz (a low-bit-rate upload), as many AudioSet clips
  are.

Levels are drawn between -40 and -12 dBFS RMS. Without espeak-ng on the PATH, speech is replaced
by a formant-synthesised babble (pulse train through moving vocal-tract resonances); the result
says which was used.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

KINDS = ("speech", "music", "street", "nature", "mixture")
_SENTENCES = {
    "en": ["The quick brown fox jumps over the lazy dog near the river bank.",
           "Please remember to bring the documents to the meeting tomorrow morning.",
           "I think we should leave before the traffic gets any worse tonight.",
           "Welcome back to the channel, today we are going to build something new.",
           "The weather forecast says it will rain for most of the weekend."],
    "fr": ["Bonjour à tous, nous allons commencer la visite du musée.",
           "Il fait beau aujourd'hui, allons nous promener au parc."],
    "de": ["Der Zug nach Berlin fährt heute leider mit zwanzig Minuten Verspätung.",
           "Könnten Sie mir bitte sagen, wo der Bahnhof ist?"],
    "es": ["Buenos días, hoy vamos a hablar de la historia de la ciudad.",
           "¿Dónde está la biblioteca más cercana, por favor?"],
    "it": ["Questa sera andiamo a cena in quel ristorante vicino alla piazza."],
}
_VARIANTS = ("m1", "m3", "m5", "f1", "f2", "f4", "klatt", "klatt3", "croak", "whisper", "Andy", "Annie")


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def _speak(rng: np.random.Generator, seconds: float, sr: int) -> np.ndarray:
    """``seconds`` of speech: espeak-ng utterances separated by pauses, at ``sr``."""
    out, n = [], int(seconds * sr)
    total = 0
    with tempfile.TemporaryDirectory() as tmp:
        while total < n:
            lang = str(rng.choice(list(_SENTENCES)))
            text = str(rng.choice(_SENTENCES[lang]))
            voice = f"{lang}+{rng.choice(_VARIANTS)}"
            wav = Path(tmp) / "u.wav"
            subprocess.run(["espeak-ng", "-v", voice, "-s", str(int(rng.integers(120, 200))),
                            "-p", str(int(rng.integers(20, 80))), "-w", str(wav), text],
                           check=True, capture_output=True)
            x, r = sf.read(wav, dtype="float32")
            x = soxr.resample(x, r, sr) if r != sr else x
            pause = np.zeros(int(rng.uniform(0.1, 0.8) * sr), np.float32)
            out += [x * rng.uniform(0.5, 1.0), pause]
            total += x.size + pause.size
    speech = np.concatenate(out)
    start = int(rng.integers(0, max(1, speech.size - n)))  # a random cut, as AudioSet's 10 s are
    return speech[start : start + n]


def _babble(rng: np.random.Generator, seconds: float, sr: int) -> np.ndarray:
    """Speech-like sound without espeak-ng: a glottal pulse train through moving formants."""
    n = int(seconds * sr)
    t = np.arange(n) / sr
    f0 = rng.uniform(90, 220) * (1 + 0.15 * np.sin(2 * np.pi * rng.uniform(0.5, 3) * t))
    src = (np.sin(2 * np.pi * np.cumsum(f0) / sr) > 0.95).astype(np.float64)
    syll = (np.sin(2 * np.pi * rng.uniform(3, 5) * t) > -0.2).astype(np.float64)
    x = np.zeros(n)
    spec = np.fft.rfft(src * syll)
    freqs = np.fft.rfftfreq(n, 1 / sr)
    for fc, bw in ((rng.uniform(400, 800), 120), (rng.uniform(1000, 2000), 180), (2800, 300)):
        x += np.fft.irfft(spec / (1 + ((freqs - fc) / bw) ** 2), n)
    return x.astype(np.float32)


def _speech(rng, seconds, sr, use_espeak):
    return _speak(rng, seconds, sr) if use_espeak else _babble(rng, seconds, sr)


def _colored_noise(rng: np.random.Generator, n: int, exponent: float) -> np.ndarray:
    """Noise with power ~ 1/f**exponent (1: pink, 2: brown), unit RMS."""
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n)
    f[0] = f[1]
    x = np.fft.irfft(spec / f ** (exponent / 2), n)
    return (x / x.std()).astype(np.float32)


def _lowpass(x: np.ndarray, sr: int, cutoff: float) -> np.ndarray:
    spec = np.fft.rfft(x)
    spec[np.fft.rfftfreq(x.size, 1 / sr) > cutoff] = 0
    return np.fft.irfft(spec, x.size).astype(np.float32)


def _reverb(rng: np.random.Generator, x: np.ndarray, sr: int, rt60: float, wet: float) -> np.ndarray:
    """A room: convolution with exponentially decaying noise (decay time ``rt60`` s)."""
    m = int(rt60 * sr)
    ir = rng.standard_normal(m) * np.exp(-6.9 * np.arange(m) / m)
    ir = _lowpass(ir.astype(np.float32), sr, rng.uniform(3000, 9000))
    ir /= np.sqrt((ir**2).sum())
    n = x.size + m
    y = np.fft.irfft(np.fft.rfft(x, n) * np.fft.rfft(ir, n), n)[: x.size]
    return ((1 - wet) * x + wet * y).astype(np.float32)


def _level(x: np.ndarray, db: float) -> np.ndarray:
    return (x * (10 ** (db / 20) / (np.sqrt(np.mean(x**2)) + 1e-12))).astype(np.float32)


def _note(rng, t: np.ndarray, f0: float, dur: float, sr: int) -> np.ndarray:
    tt = t[: int(dur * sr)]
    vib = 1 + 0.004 * np.sin(2 * np.pi * 5.5 * tt)
    x = sum(np.sin(2 * np.pi * k * f0 * np.cumsum(vib) / sr) * np.exp(-tt * (1.5 + k)) / k**1.2
            for k in range(1, 12) if k * f0 < sr / 2)
    return x * np.minimum(1, tt / 0.01)


def _music(rng: np.random.Generator, seconds: float, sr: int) -> np.ndarray:
    n = int(seconds * sr)
    t = np.arange(n) / sr
    x = np.zeros(n)
    bpm = rng.uniform(80, 150)
    beat = 60 / bpm
    root = rng.uniform(110, 220)
    chords = [(0, 4, 7), (5, 9, 12), (7, 11, 14), (-3, 0, 4)]
    for i, start in enumerate(np.arange(0, seconds, 2 * beat)):
        s = int(start * sr)
        for semis in chords[(i // 2) % 4]:
            note = _note(rng, t, root * 2 ** (semis / 12) * 2, min(2 * beat, seconds - start), sr)
            x[s : s + note.size] += 0.3 * note
        bass = _note(rng, t, root / 2 * 2 ** (chords[(i // 2) % 4][0] / 12), min(beat, seconds - start), sr)
        x[s : s + bass.size] += 0.5 * bass
    for k, start in enumerate(np.arange(0, seconds, beat / 2)):
        s = int(start * sr)
        m = min(int(0.25 * sr), n - s)
        tt = t[:m]
        if k % 4 == 0:  # kick: a falling sine
            x[s : s + m] += 0.9 * np.sin(2 * np.pi * (50 + 100 * np.exp(-tt * 30)) * tt) * np.exp(-tt * 12)
        if k % 4 == 2:  # snare: noise + tone
            x[s : s + m] += (0.4 * rng.standard_normal(m) + 0.3 * np.sin(2 * np.pi * 190 * tt)) * np.exp(-tt * 20)
        hat = rng.standard_normal(m) * np.exp(-tt * 60)  # hi-hat: bright short noise
        x[s : s + m] += 0.15 * (hat - np.convolve(hat, np.ones(8) / 8, "same"))
    return _reverb(rng, x.astype(np.float32), sr, rng.uniform(0.3, 1.2), 0.3)


def _events(rng: np.random.Generator, n: int, sr: int, kind: str) -> np.ndarray:
    """Short sounds at random times: cars, sirens, horns, knocks (street) or birds, barks (nature)."""
    x = np.zeros(n)
    t = np.arange(n) / sr
    for _ in range(int(rng.integers(3, 9))):
        s = int(rng.uniform(0, 9) * sr)
        e = kind if rng.random() < 0.5 else str(rng.choice(["knock", "bird", "bark", "car", "horn"]))
        if e in ("street", "car"):
            m = min(int(rng.uniform(2, 5) * sr), n - s)
            swell = np.exp(-(((np.arange(m) / m) - 0.5) ** 2) / 0.03)
            x[s : s + m] += 0.8 * _lowpass(_colored_noise(rng, m, 1.0), sr, rng.uniform(1500, 4000)) * swell
        elif e == "horn":
            m = min(int(rng.uniform(0.3, 0.9) * sr), n - s)
            x[s : s + m] += 0.3 * np.sign(np.sin(2 * np.pi * rng.uniform(350, 500) * t[:m]))
        elif e == "knock":
            for j in range(int(rng.integers(2, 6))):
                k = s + int(j * rng.uniform(0.15, 0.5) * sr)
                m = min(int(0.05 * sr), n - k)
                if m > 0:
                    x[k : k + m] += 0.8 * rng.standard_normal(m) * np.exp(-t[:m] * 150)
        elif e in ("nature", "bird"):
            m = min(int(rng.uniform(0.05, 0.3) * sr), n - s)
            f = rng.uniform(2500, 6000) + 1500 * np.sin(2 * np.pi * rng.uniform(10, 40) * t[:m])
            x[s : s + m] += 0.3 * np.sin(2 * np.pi * np.cumsum(f) / sr) * np.hanning(m)
        else:  # bark: a harmonic burst with a falling pitch
            m = min(int(rng.uniform(0.15, 0.35) * sr), n - s)
            f0 = rng.uniform(300, 700) * np.exp(-t[:m] * 3)
            ph = 2 * np.pi * np.cumsum(f0) / sr
            x[s : s + m] += 0.6 * sum(np.sin(k * ph) / k for k in range(1, 15)) * np.hanning(m)
    if kind == "street" and rng.random() < 0.5:  # a siren across the whole clip
        f = 750 + 350 * np.sin(2 * np.pi * rng.uniform(0.2, 0.5) * t)
        x += 0.1 * np.sin(2 * np.pi * np.cumsum(f) / sr) * np.linspace(0.2, 1, n) ** 2
    return x.astype(np.float32)


def _noise_bed(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    bed = rng.uniform(0.3, 1) * _colored_noise(rng, n, 2.0) + rng.uniform(0.1, 0.6) * _colored_noise(rng, n, 1.0)
    drift = 1 + 0.5 * np.sin(2 * np.pi * rng.uniform(0.05, 0.4) * np.arange(n) / sr + rng.uniform(0, 6))
    return (bed * drift).astype(np.float32)


def synthesize_realistic_clip(index: int, seed: int = 0, sr: int = 44100, seconds: float = 10.0,
                              use_espeak: bool | None = None) -> tuple[np.ndarray, str]:
    """Clip ``index`` of the cycle described in the module docstring: (mono (N,) float32, kind)."""
    rng = np.random.default_rng([seed, index])
    use_espeak = espeak_available() if use_espeak is None else use_espeak
    kind = KINDS[index % len(KINDS)]
    n = int(seconds * sr)
    bed = _noise_bed(rng, n, sr)
    if kind == "speech":
        fg = _reverb(rng, _speech(rng, seconds, sr, use_espeak), sr, rng.uniform(0.2, 0.8), rng.uniform(0.1, 0.4))
        x = _level(fg, 0) + _level(bed, -rng.uniform(5, 25))
    elif kind == "music":
        x = _level(_music(rng, seconds, sr), 0) + _level(bed, -rng.uniform(20, 40))
    elif kind == "street":
        far = _reverb(rng, _speech(rng, seconds, sr, use_espeak), sr, 1.0, 0.6)
        x = _level(bed, 0) + _level(_events(rng, n, sr, "street"), rng.uniform(-3, 6)) + _level(far, -15)
    elif kind == "nature":
        wind = _colored_noise(rng, n, 2.0) * (1 + 0.8 * _lowpass(_colored_noise(rng, n, 2.0), sr, 2))
        rain = (rng.random(n) < 0.002) * rng.standard_normal(n)
        x = _level(wind, 0) + _level(_events(rng, n, sr, "nature"), rng.uniform(-6, 6)) + _level(rain, -20)
    else:
        x = (_level(_speech(rng, seconds, sr, use_espeak), 0) + _level(_music(rng, seconds, sr), -rng.uniform(3, 12))
             + _level(bed, -20))
    if index % 4 == 3:  # a low-bit-rate upload: nothing above 8 or 11 kHz
        x = _lowpass(x, sr, float(rng.choice([8000.0, 11025.0])))
    x = _level(x, -rng.uniform(12, 40))
    return np.clip(x, -1, 1).astype(np.float32), kind


def write_realistic_clips(folder: Path, n: int, seed: int = 0) -> tuple[list[Path], list[str], bool]:
    """``n`` 10 s FLAC clips ``real{i:06d}.flac`` (16-bit; 44.1 kHz stereo, 32 or 48 kHz mono).

    Returns (paths, kinds, whether espeak-ng made the speech).
    """
    folder.mkdir(parents=True, exist_ok=True)
    use_espeak = espeak_available()
    paths, kinds = [], []
    for i in range(n):
        sr, channels = ((44100, 2), (32000, 1), (48000, 1))[i % 3]
        x, kind = synthesize_realistic_clip(i, seed, sr, use_espeak=use_espeak)
        if channels == 2:  # some stereo width: the channels differ in level and in their room
            room = _reverb(np.random.default_rng([seed, i, 1]), x, sr, 0.5, 1.0)
            x = np.stack([x, np.clip(0.8 * x + 0.2 * room, -1, 1)], axis=1)
        path = folder / f"real{i:06d}.flac"
        sf.write(path, x, sr, subtype="PCM_16")
        paths.append(path)
        kinds.append(kind)
    return paths, kinds, use_espeak


def write_realistic_dataset(root: Path, n: int, seed: int = 0) -> tuple[Path, Path, Path, list[str], bool]:
    """``n`` clips as an AudioSet download: ``(segments.csv, labels.csv, audio folder, kinds, espeak)``.

    Each clip's label is its kind (speech, music, ...), so the builder and loaders run unchanged.
    """
    audio = root / "audio"
    paths, kinds, use_espeak = write_realistic_clips(audio, n, seed)
    labels = root / "labels.csv"
    labels.write_text("index,mid,display_name\n" + "".join(f'{i},/x/{k},"{k}"\n' for i, k in enumerate(KINDS)))
    segments = root / "segments.csv"
    segments.write_text("# YTID, start_seconds, end_seconds, positive_labels\n"
                        + "".join(f"{p.stem},0,10,/x/{k}\n" for p, k in zip(paths, kinds)))
    return segments, labels, audio, kinds, use_espeak
