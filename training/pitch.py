"""The one f0 estimator: YIN in torch, scriptable, shared by `prepare`, training and `encode`.

`yin` is the core (de Cheveigné & Kawahara 2002): the cumulative mean normalised difference
of each frame, the bottom of its first dip under a threshold (the global minimum where none
dips that far), refined by parabolic interpolation; a frame whose period is shorter than the
range allows (a pitch above `F0_MAX_HZ`) is unpitched. `PitchTracker` turns audio into the
decoder's pitch inputs per latent frame: pitch in MIDI note units and a voicing confidence.

Frame convention: value `t` describes the signal at sample `(t + 1) * hop`, the end of output
block `t`, because the decoder's harmonic path glides from frame `t - 1`'s pitch to frame `t`'s
across that block. The YIN window is centred there and compared with the signal before it (lags
reach back, not ahead), so the tracker looks only `window / 2` samples ahead: live input reaches
the output sooner than with lags that reach forward.

Clean-up, so that a phase accumulator driven by the result never jumps: octave errors (a voiced
frame a whole number of octaves off the median of itself and the `OCTAVE_BEFORE` frames before it,
when those are voiced too) are snapped back, and unvoiced frames hold the pitch of the last voiced
frame (the first voiced one before any; `rest_pitch` where the call has none). Voicing stays the
raw confidence: the decoder gates its harmonics with it.

The octave check reads only frames before its own, so it adds no look-ahead: live input reaches
the output a frame (5.3 ms) sooner than with a median centred on the frame. The price is a legato
leap of exactly an octave, which is read one frame late (its first frame looks like an error of
the notes before it); a note that starts after a rest or a breath is read at once, as the check
trusts only voiced frames.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

# the estimator's parameters: recorded in a prepared set's manifest and in model metadata
F0_MIN_HZ = 40.0
F0_MAX_HZ = 2000.0
YIN_WINDOW = 1024
YIN_THRESHOLD = 0.15
VOICED_THRESHOLD = 0.5
# below -70 dBFS (RMS over the window) a frame is silent: voicing 0; full confidence from -60
SILENCE_DB = -70.0
SILENCE_RAMP_DB = 10.0
REST_PITCH = 60.0
# frames before each frame that the octave check's median takes in beside it (none after it: a frame
# of look-ahead here would be a frame of latency for live input)
OCTAVE_BEFORE = 2


def correlation_size(span: int, window: int) -> int:
    """FFT size for a linear (not circular) correlation of a `window` head with a `span`."""
    return 1 << (span + window).bit_length()


def yin(seg: Tensor, sample_rate: int, window: int, tau_min: int, tau_max: int,
        threshold: float, n: int) -> tuple[Tensor, Tensor]:
    """f0 in Hz and confidence (1 - the normalised difference at the chosen lag) of each frame of
    `seg` `(batch, frames, span)`, span >= window + tau_max + 1; each `(batch, frames)`.
    `n` is `correlation_size(span, window)`."""
    head = seg[..., :window]
    # cross term sum_j x_j x_{j+tau} for tau in 0..tau_max, by FFT correlation
    cross = torch.fft.irfft(torch.fft.rfft(seg, n) * torch.conj(torch.fft.rfft(head, n)), n)[..., :tau_max + 1]
    energy = F.pad(torch.cumsum(seg.square(), -1), (1, 0))  # energy[k] = sum_{j<k} x_j^2
    lags = torch.arange(tau_max + 1, device=seg.device)
    shifted = energy[..., window:window + tau_max + 1] - energy[..., :tau_max + 1]  # sum_{j<window} x_{j+tau}^2
    diff = (energy[..., window:window + 1] + shifted - 2.0 * cross).clamp(min=0.0)
    cum = torch.cumsum(diff[..., 1:], -1)
    ratio = diff[..., 1:] * lags[1:] / cum.clamp(min=1e-20)
    cmnd = torch.cat([torch.ones_like(diff[..., :1]),
                      torch.where(cum > 1e-20, ratio, torch.ones_like(ratio))], -1)
    search = cmnd[..., tau_min:tau_max]
    nxt = cmnd[..., tau_min + 1:tau_max + 1]
    dip = (search < threshold) & (search <= nxt)
    first = torch.argmax(dip.to(torch.int8), -1)
    best = torch.where(dip.any(-1), first, torch.argmin(search, -1)) + tau_min
    # parabolic interpolation around the chosen lag, on the difference function itself: the
    # normalisation's slope biases the normalised one (3.4 cents at 1760 Hz, 0.1 on d)
    lo = diff.gather(-1, (best - 1).unsqueeze(-1)).squeeze(-1)
    mid = diff.gather(-1, best.unsqueeze(-1)).squeeze(-1)
    hi = diff.gather(-1, (best + 1).clamp(max=tau_max).unsqueeze(-1)).squeeze(-1)
    denom = lo - 2.0 * mid + hi
    shift = torch.where(denom.abs() > 1e-12, 0.5 * (lo - hi) / denom, torch.zeros_like(denom)).clamp(-1.0, 1.0)
    f0 = sample_rate / (best.to(seg.dtype) + shift)
    confidence = (1.0 - cmnd.gather(-1, best.unsqueeze(-1)).squeeze(-1)).clamp(0.0, 1.0)
    # a period shorter than the shortest lag searched: the pitch lies above the range, and what
    # the search found is a subharmonic of it, so the frame counts as unpitched
    above = cmnd[..., 2:tau_min].min(-1).values < threshold
    return f0, torch.where(above, torch.zeros_like(confidence), confidence)


def hz_to_midi(f0: Tensor) -> Tensor:
    return 69.0 + 12.0 * torch.log2(f0.clamp(min=1e-3) / 440.0)


def midi_to_hz(pitch: Tensor) -> Tensor:
    return 440.0 * torch.pow(2.0, (pitch - 69.0) / 12.0)


class PitchTracker(nn.Module):
    """Audio `(batch, 1, samples)` -> `(batch, 2, samples // hop)`: pitch (MIDI note units, filled
    and octave-corrected, 0..127) and voicing (0..1). Stateless: each call sees its own samples
    (zero beyond them). Scriptable; no parameters."""

    __constants__ = ["sample_rate", "hop", "window", "tau_min", "tau_max", "span", "n_fft", "threshold",
                     "voiced_threshold", "rest_pitch", "silence_db", "silence_ramp_db", "yin_lag", "history",
                     "before", "octave_before"]

    def __init__(self, sample_rate: int = 48000, hop: int = 256) -> None:
        super().__init__()
        self.sample_rate, self.hop, self.window = sample_rate, hop, YIN_WINDOW
        self.tau_min = max(2, int(sample_rate / F0_MAX_HZ))
        self.tau_max = int(math.ceil(sample_rate / F0_MIN_HZ))
        self.span = self.window + self.tau_max + 1
        self.n_fft = correlation_size(self.span, self.window)
        self.threshold, self.voiced_threshold, self.rest_pitch = YIN_THRESHOLD, VOICED_THRESHOLD, REST_PITCH
        self.silence_db, self.silence_ramp_db = SILENCE_DB, SILENCE_RAMP_DB
        self.octave_before = OCTAVE_BEFORE
        # frame t's span ends at (t + 1) * hop + window / 2, the end of its YIN window: it starts
        # `before` samples before block t, and streaming has it `yin_lag` frames after block t
        # arrived, keeping `history` samples before a call's new blocks for it
        self.before = self.span - self.window // 2 - hop
        if self.before < 0:
            raise ValueError(f"a hop of {hop} is longer than the YIN span allows")
        self.yin_lag = -(-(self.window // 2) // hop)
        self.history = self.before + self.yin_lag * hop

    @torch.jit.unused
    def parameters_dict(self) -> dict[str, object]:
        """What a prepared set's manifest and a model's metadata record of the estimator."""
        return {"estimator": "yin (synthd, torch)", "f0_min_hz": F0_MIN_HZ, "f0_max_hz": F0_MAX_HZ,
                "window": YIN_WINDOW, "threshold": YIN_THRESHOLD, "voiced_threshold": VOICED_THRESHOLD,
                "silence_dbfs": SILENCE_DB, "frame": "value t at sample (t + 1) * hop",
                "lags": "backward from the window", "unvoiced": "holds the last voiced pitch",
                "octave_fix": f"snapped to the median of the frame and the {OCTAVE_BEFORE} before it, when voiced",
                "hop": self.hop, "sample_rate": self.sample_rate}

    def raw(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Unprocessed f0 (Hz) and confidence per frame, `(batch, frames)`, from `x`
        `(batch, samples)`; silent frames get confidence 0."""
        frames = x.shape[-1] // self.hop
        return self._estimate(self.pad(x).unfold(-1, self.span, self.hop)[:, :frames])

    def pad(self, x: Tensor) -> Tensor:
        """`x` `(..., samples)` as float32 with the zeros either side that its frames' spans read:
        frame t's span is then samples t * hop .. t * hop + span of the result."""
        # float32: within 2e-5 semitones and 5e-7 of voicing of float64 on tones, glides and
        # noise, at a third of the time
        return F.pad(x.float(), (self.before, self.window // 2))

    def _estimate(self, seg: Tensor) -> tuple[Tensor, Tensor]:
        """f0 (Hz) and confidence of YIN spans `(batch, frames, span)` whose window is their last
        `window` samples; silent spans get confidence 0."""
        # reversed, the window comes first and the lags reach back in time
        seg = seg.flip(-1)
        f0, confidence = yin(seg, self.sample_rate, self.window, self.tau_min, self.tau_max, self.threshold,
                             self.n_fft)
        level = 10.0 * torch.log10(seg[..., :self.window].square().mean(-1) + 1e-20)
        gate = ((level - self.silence_db) / self.silence_ramp_db).clamp(0.0, 1.0)
        return f0, confidence * gate

    def finish(self, f0: Tensor, confidence: Tensor) -> Tensor:
        """Raw estimates `(batch, frames)` -> `(batch, 2, frames)` float32 pitch and voicing."""
        pitch = hz_to_midi(f0)
        if pitch.shape[-1] == 0:  # shorter than a frame
            return torch.stack([pitch, confidence], 1).float()
        voiced = confidence > self.voiced_threshold
        # before the signal: unvoiced frames, which the octave check does not trust
        before = self.octave_before
        rest = torch.full((pitch.shape[0], before), self.rest_pitch, dtype=pitch.dtype, device=pitch.device)
        unvoiced = torch.zeros((voiced.shape[0], before), dtype=torch.bool, device=voiced.device)
        pitch = self._snap_octaves(torch.cat([rest, pitch], -1), torch.cat([unvoiced, voiced], -1))
        return torch.stack([self._fill(pitch, voiced).clamp(0.0, 127.0), confidence], 1).float()

    @property
    def lookahead_frames(self) -> int:
        """Streaming gives frame t this many frames after its own block arrived: the YIN span's
        reach past its window's centre (the octave check reads no frame after its own)."""
        return self.yin_lag

    def initial_state(self, batch: int) -> list[Tensor]:
        """The start of a stream: silence before it, the octave check's `octave_before` unvoiced
        frames, `rest_pitch` held (the last voiced pitch before the stream)."""
        kept = self.octave_before
        return [torch.zeros(batch, self.history), torch.full((batch, kept), self.rest_pitch),
                torch.zeros(batch, kept), torch.full((batch, 1), self.rest_pitch)]

    def step(self, x: Tensor, state: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """Streaming: `x` `(batch, 1, samples)` continuing the stream of `state` -> `(batch, 2,
        samples // hop)` pitch and voicing, and the new state. Output k is frame k - lookahead_frames
        of the stream, as `forward` reads it on the whole, except that unvoiced frames before the
        first voiced one hold `rest_pitch` (a stream cannot know its first note in advance).
        Chunked calls equal one call."""
        frames = x.shape[-1] // self.hop
        if frames == 0:  # shorter than a frame: samples past a whole frame are not used
            return torch.zeros(x.shape[0], 2, 0), state
        audio = torch.cat([state[0], x.reshape(x.shape[0], -1)[:, :frames * self.hop].float()], -1)
        f0, confidence = self._estimate(audio.unfold(-1, self.span, self.hop)[:, :frames])
        # the previous call's last `octave_before` frames, then the new ones
        pitch = torch.cat([state[1], hz_to_midi(f0)], -1)
        confidence = torch.cat([state[2], confidence], -1)
        voiced = confidence > self.voiced_threshold
        before = self.octave_before
        fixed = self._fill_from(self._snap_octaves(pitch, voiced), voiced[:, before:], state[3])
        out = torch.stack([fixed.clamp(0.0, 127.0), confidence[:, before:]], 1)
        new_state = [audio[:, audio.shape[1] - self.history:], pitch[:, frames:], confidence[:, frames:],
                     fixed[:, frames - 1:frames]]
        return out, new_state

    def _snap_octaves(self, pitch: Tensor, voiced: Tensor) -> Tensor:
        """Raw pitch and voicing `(batch, octave_before + frames)`, frames >= 1 -> the last `frames`
        frames of `pitch`, each moved back onto the median of itself and the `octave_before` frames
        before it where it lies a whole number of octaves (within a semitone) off that median and
        those frames are voiced (a note after a rest may lie an octave from the last one)."""
        before = self.octave_before
        own = pitch[:, before:]
        window = pitch.unfold(-1, before + 1, 1)
        trusted = voiced.unfold(-1, before + 1, 1)[..., :before].all(-1)
        median = window.median(-1).values
        octaves = torch.round((own - median) / 12.0)
        off = trusted & (octaves != 0) & ((own - median - 12.0 * octaves).abs() < 1.0)
        return torch.where(off, own - 12.0 * octaves, own)

    def _fill_from(self, pitch: Tensor, voiced: Tensor, before: Tensor) -> Tensor:
        """Each unvoiced frame of `pitch` `(batch, frames)` takes the last voiced frame's pitch, or
        `before` `(batch, 1)` (the last voiced pitch before these frames) when none is."""
        index = torch.arange(pitch.shape[-1], device=pitch.device).expand_as(pitch)
        last = torch.cummax(torch.where(voiced, index, torch.full_like(index, -1)), -1).values
        held = pitch.gather(-1, last.clamp(min=0))
        return torch.where(last >= 0, held, before.expand_as(pitch))

    def _fill(self, pitch: Tensor, voiced: Tensor) -> Tensor:
        """Each unvoiced frame takes the last voiced frame's pitch (the first voiced one before it,
        `rest_pitch` in a row with none)."""
        first = pitch.gather(-1, torch.argmax(voiced.to(torch.int8), -1, keepdim=True))
        before = torch.where(voiced.any(-1, keepdim=True), first, torch.full_like(first, self.rest_pitch))
        return self._fill_from(pitch, voiced, before)

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            f0, confidence = self.raw(x.reshape(x.shape[0], -1))
            return self.finish(f0, confidence)


def track_long(tracker: PitchTracker, x: Tensor, chunk_frames: int = 2048) -> Tensor:
    """`tracker` on one long signal `(samples,)` in chunks of frames (bounded memory), with the
    clean-up over the whole: `(2, samples // hop)`, equal to one call."""
    hop = tracker.hop
    frames = x.shape[-1] // hop
    f0s, confs = [], []
    padded = tracker.pad(x)
    with torch.no_grad():
        for start in range(0, frames, chunk_frames):
            count = min(chunk_frames, frames - start)
            piece = padded[start * hop:(start + count - 1) * hop + tracker.span]
            f0, conf = tracker._estimate(piece[None].unfold(-1, tracker.span, hop))
            f0s.append(f0)
            confs.append(conf)
        if not f0s:
            return torch.zeros(2, 0)
        return tracker.finish(torch.cat(f0s, -1), torch.cat(confs, -1))[0]
