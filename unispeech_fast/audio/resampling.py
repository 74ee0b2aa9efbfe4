"""Band-limited resampling to the models' rate (:data:`SAMPLE_RATE`): a Kaiser-windowed sinc polyphase filter."""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

__all__ = ["SAMPLE_RATE", "resample"]

SAMPLE_RATE = 16_000  # the models' input rate: every input is resampled to it (the one definition in the package)

# Memory bounds of resampling. Common ratios (8, 22.05, 44.1, 48 kHz to 16 kHz) run as one strided
# conv1d whose weight ``[up, 1, down + 2 * pad + 1]`` has at most _BANK_MAX_TAPS entries (8 MiB in
# float64; at most _BANK_CACHE weights are cached). Other ratios (e.g. 2001 or 16001 Hz to 16 kHz:
# 16000 phases, a 0.26 to 2 GiB conv weight) gather each output's 2 * pad + 1 input samples instead,
# with taps from a cached per-phase bank when that is small, else computed per chunk of outputs; the
# chunks hold at most _CHUNK_TAPS taps, so the working memory is bounded whatever the ratio and length.
_BANK_MAX_TAPS = 1 << 20
_BANK_CACHE = 8
_CHUNK_TAPS = 1 << 21


def _filter_geometry(orig: int, new: int, zeros: int, rolloff: float) -> tuple[int, int, float, float, int]:
    """``(up, down, cutoff, half_width, pad)`` of the resampling filter (see :func:`_filter_taps`)."""
    g = math.gcd(orig, new)
    up, down = new // g, orig // g
    cutoff = 0.5 * rolloff * min(1.0, up / down)
    half_width = zeros / (2.0 * cutoff)
    return up, down, cutoff, half_width, int(math.ceil(half_width))


def _filter_taps(phases: torch.Tensor, up: int, cutoff: float, half_width: float, pad: int,
                 beta: float) -> torch.Tensor:
    """Taps ``[len(phases), 2 * pad + 1]`` (float64) of the outputs at fractional input offsets ``phases / up``.

    With ``up/down = new/orig`` in lowest terms, output sample ``n`` sits at input position
    ``n * down / up = q + p / up`` (``q`` integer, ``0 <= p < up``); it is
    ``sum_j x[q + j] * h(p / up - j)`` for ``j`` in ``[-pad, pad]``, the input convolved with a
    Kaiser-windowed ideal low-pass ``h(t) = 2 f sinc(2 f t) w(t)``, ``t`` in input samples, cut off at
    ``f = rolloff / 2 * min(1, up / down)`` cycles per input sample (just below the lower of the two
    Nyquist frequencies: this is the anti-aliasing filter), ``w`` a Kaiser window over ``zeros`` zero
    crossings of the sinc on each side. Row ``i``, column ``pad + j`` holds ``h(phases[i] / up - j)``.
    """
    j = torch.arange(-pad, pad + 1, dtype=torch.float64)
    t = phases.to(torch.float64)[:, None] / up - j
    i0_beta = torch.special.i0(torch.tensor(beta, dtype=torch.float64))
    inside = t.abs() <= half_width
    window = torch.special.i0(beta * torch.sqrt((1.0 - (t / half_width) ** 2).clamp(min=0.0))) / i0_beta
    return torch.where(inside, 2.0 * cutoff * torch.sinc(2.0 * cutoff * t) * window, torch.zeros_like(t))


@functools.lru_cache(maxsize=_BANK_CACHE)
def _filter_bank(orig: int, new: int, zeros: int, rolloff: float, beta: float) -> torch.Tensor:
    """All ``up`` phases' taps ``[up, 2 * pad + 1]`` (float64), for ratios whose bank is small."""
    up, _, cutoff, half_width, pad = _filter_geometry(orig, new, zeros, rolloff)
    return _filter_taps(torch.arange(up), up, cutoff, half_width, pad, beta)


@functools.lru_cache(maxsize=_BANK_CACHE)
def _conv_weight(orig: int, new: int, zeros: int, rolloff: float, beta: float) -> torch.Tensor:
    """The filter as strided-conv1d weights ``[up, 1, down + 2 * pad + 1]`` (float64).

    Outputs ``n = n0 + up * m`` share the phase ``p = n0 * down mod up`` and the offset
    ``q0 = floor(n0 * down / up)``, so one conv1d of stride ``down`` with ``up`` output channels
    computes them all; channel ``n0`` holds ``h(p / up - j)`` at tap ``q0 + j + pad``.
    """
    up, down, _, _, pad = _filter_geometry(orig, new, zeros, rolloff)
    bank = _filter_bank(orig, new, zeros, rolloff, beta)
    weight = torch.zeros(up, 1, down + 2 * pad + 1, dtype=torch.float64)
    for n0 in range(up):
        q0 = (n0 * down) // up
        weight[n0, 0, q0:q0 + 2 * pad + 1] = bank[(n0 * down) % up]
    return weight


def resample(
    wave: np.ndarray | torch.Tensor,
    orig_rate: int,
    new_rate: int = SAMPLE_RATE,
    *,
    zeros: int = 24,
    rolloff: float = 0.945,
    beta: float = 8.6,
) -> np.ndarray | torch.Tensor:
    """Band-limited resampling by a rational ratio with a Kaiser-windowed sinc (polyphase) filter.

    ``wave`` is ``[samples]`` or ``[channels, samples]`` (numpy or torch; the result has the same
    kind, float32 unless the input is float64). The output has ``ceil(samples * new / orig)`` samples;
    output sample ``n`` is the band-limited input at time ``n / new_rate``. The low-pass filter's cutoff
    (half gain) is ``rolloff`` times the lower Nyquist frequency, with a transition band around it: with
    the defaults, 44.1 kHz to 16 kHz passes sines with gain 1.0000 up to 0.81x the output Nyquist
    frequency (6.5 kHz), 0.977 at 0.875x (7 kHz), 0.81 at 0.91x, 0.5 at 0.945x (the cutoff). Frequencies
    above the output Nyquist frequency are suppressed (anti-aliasing), by about 80 dB past the transition
    band. See :func:`_filter_taps` for the construction.

    Memory is bounded for every pair of rates: only the taps of the phases in use are built (at
    most ``2 * pad + 1`` per output phase, ``pad`` about ``zeros / rolloff * max(1, orig / new)``),
    cached only when small, and the outputs are computed in chunks.
    """
    for name, rate in (("orig_rate", orig_rate), ("new_rate", new_rate)):
        if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)) or rate <= 0:
            raise ValueError(f"{name} must be a positive integer sample rate in Hz, got {rate!r}")
    if not 0.0 < rolloff <= 1.0:
        raise ValueError(f"rolloff must be in (0, 1], got {rolloff!r}")
    if isinstance(zeros, bool) or not isinstance(zeros, int) or zeros < 1:
        raise ValueError(f"zeros must be a positive int (zero crossings per side), got {zeros!r}")
    is_numpy = not isinstance(wave, torch.Tensor)
    x = torch.from_numpy(np.asarray(wave)) if is_numpy else wave
    if x.dim() not in (1, 2):
        raise ValueError(f"wave must have shape [samples] or [channels, samples], got {tuple(x.shape)}")
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    x = x.to(dtype)
    if int(orig_rate) == int(new_rate):
        out = x
    else:
        orig, new = int(orig_rate), int(new_rate)
        up, down, cutoff, half_width, pad = _filter_geometry(orig, new, zeros, float(rolloff))
        width = 2 * pad + 1
        rows = x.reshape(-1, x.shape[-1])
        n_in = rows.shape[-1]
        n_out = -(-n_in * up // down)
        if up * (down + width) <= _BANK_MAX_TAPS:  # a small polyphase conv weight: one strided conv1d
            weight = _conv_weight(orig, new, zeros, float(rolloff), float(beta))
            steps = -(-n_out // up)
            needed = (steps - 1) * down + weight.shape[-1]
            padded = torch.nn.functional.pad(rows[:, None, :], (pad, max(0, needed - n_in - pad)))
            y = torch.nn.functional.conv1d(padded, weight.to(device=x.device, dtype=dtype), stride=down)
            out = y[..., :steps].transpose(1, 2).reshape(rows.shape[0], -1)[:, :n_out]
        else:  # gather each output's 2 * pad + 1 inputs, chunk by chunk
            bank = None
            if up * width <= _BANK_MAX_TAPS:
                bank = _filter_bank(orig, new, zeros, float(rolloff), float(beta)).to(device=x.device, dtype=dtype)
            # windows[:, i] = x[i - pad : i + pad + 1] (zeros outside), a view of the padded input
            windows = torch.nn.functional.pad(rows, (pad, pad)).unfold(-1, width, 1)
            out = torch.empty(rows.shape[0], n_out, dtype=dtype, device=x.device)
            chunk = max(1, _CHUNK_TAPS // (width * rows.shape[0]))
            for start in range(0, n_out, chunk):
                n = torch.arange(start, min(n_out, start + chunk), dtype=torch.int64)
                q, p = (n * down) // up, (n * down) % up
                if bank is not None:
                    taps = bank[p.to(x.device)]
                else:
                    taps = _filter_taps(p, up, cutoff, half_width, pad, float(beta)).to(device=x.device, dtype=dtype)
                out[:, start:start + n.numel()] = (windows[:, q.to(x.device)] * taps).sum(dim=-1)
        out = out.reshape(*x.shape[:-1], n_out)
    return out.numpy() if is_numpy else out
