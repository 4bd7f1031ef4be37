"""When a simulated device is online: alternating windows drawn from per-model distributions.

Windows are drawn in nominal hours (what a device in a hospital does) and played
`time_scale` times faster: at the demo's scale a nominal 72 h is half a minute.
Some offline windows are longer than a certificate's lifetime, so the renewal
grace path and queued renewals are exercised; a few are longer than lifetime
plus grace, so a device comes back stranded and needs a new token.
"""
from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Pattern:
    online_h: float          # mean online window
    offline_h: float         # mean ordinary offline window
    long_p: float            # chance an offline window is a long one (storage, transport, repair)
    long_h: tuple[float, float]


PATTERNS = {
    "infusion-pump": Pattern(online_h=24, offline_h=6, long_p=0.15, long_h=(75, 95)),
    "patient-monitor": Pattern(online_h=48, offline_h=2, long_p=0.05, long_h=(75, 90)),
    "ventilator": Pattern(online_h=8, offline_h=4, long_p=0.10, long_h=(75, 95)),
    "imaging-ct": Pattern(online_h=72, offline_h=1, long_p=0.0, long_h=(0, 0)),
    "home-monitor": Pattern(online_h=4, offline_h=12, long_p=0.10, long_h=(100, 160)),
}
DEFAULT = Pattern(online_h=24, offline_h=4, long_p=0.05, long_h=(75, 90))
MODELS = tuple(PATTERNS)


class Connectivity:
    """Draws one device's windows (wall-clock seconds) from its model's pattern and a seeded RNG."""

    def __init__(self, model: str, rng: random.Random, time_scale: float, intermittent: bool) -> None:
        self._p = PATTERNS.get(model, DEFAULT)
        self._rng = rng
        self._scale = 3600.0 / time_scale
        self.intermittent = intermittent

    def online(self) -> float:
        if not self.intermittent:
            return float("inf")
        return self._rng.expovariate(1 / self._p.online_h) * self._scale

    def offline(self) -> float:
        if self._p.long_p and self._rng.random() < self._p.long_p:
            return self._rng.uniform(*self._p.long_h) * self._scale
        return self._rng.expovariate(1 / self._p.offline_h) * self._scale
