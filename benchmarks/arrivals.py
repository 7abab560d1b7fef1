"""Open-loop traffic: when requests arrive, which adapter each asks for, and what text it sends.

- Arrivals: Poisson (exponential gaps, coefficient of variation 1) or bursty Gamma gaps with a
  chosen coefficient of variation ``cv`` (shape ``1 / cv**2``); both have mean gap ``1 / rate``.
  A Gamma with cv 1 is the Poisson process; cv 3 sends the same mean rate in clumps.
- Popularity: uniform, or Zipf (power law) over adapter ranks: adapter ``i`` (0-based) is drawn
  with probability proportional to ``1 / (i + 1) ** s``, so adapter 0 is the hottest.
- Texts: real messages from the packaged corpora ``training`` reads (SMS spam, tweets, BBC
  news), so input lengths follow real data rather than random token counts.

Everything is a pure function of its arguments and a seeded ``numpy`` generator.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

ARRIVALS = ("poisson", "gamma")
POPULARITIES = ("uniform", "zipf")
CORPORA = ("sms", "tweets", "news")
# characters kept of each text by default; news articles are cut as `graft train` cuts them
DEFAULT_MAX_CHARS = {"sms": None, "tweets": None, "news": 1000}


@dataclass(frozen=True, slots=True)
class TrafficConfig:
    """What one open-loop run sends; built once from the command line."""

    rate_rps: float  # mean offered requests per second
    arrival: str = "poisson"  # one of ARRIVALS
    cv: float = 1.0  # coefficient of variation of the gaps (gamma only)
    popularity: str = "zipf"  # one of POPULARITIES
    zipf_s: float = 1.1  # Zipf exponent
    num_adapters: int = 1  # adapters the traffic spreads over
    inputs_per_request: int = 1  # texts in each request
    max_requests: int = 1_000_000  # stop sending after this many
    duration_s: float = 10.0  # stop sending after this long

    def __post_init__(self) -> None:
        if not self.rate_rps > 0:
            raise ValueError(f"rate must be > 0 requests/s, got {self.rate_rps}")
        if self.arrival not in ARRIVALS:
            raise ValueError(f"arrival must be one of {ARRIVALS}, got {self.arrival!r}")
        if not self.cv > 0:
            raise ValueError(f"cv must be > 0, got {self.cv}")
        if self.popularity not in POPULARITIES:
            raise ValueError(f"popularity must be one of {POPULARITIES}, got {self.popularity!r}")
        if not self.zipf_s > 0:
            raise ValueError(f"zipf exponent must be > 0, got {self.zipf_s}")
        for name in ("num_adapters", "inputs_per_request", "max_requests"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.duration_s > 0:
            raise ValueError(f"duration must be > 0 s, got {self.duration_s}")


@dataclass(frozen=True, slots=True)
class Arrival:
    """One request of the schedule."""

    t_s: float  # intended send time, seconds after the run starts
    adapter: int  # index into the target's adapter list; 0 is the most popular
    texts: tuple[str, ...]  # the inputs, inputs_per_request of them


def inter_arrival_s(
    arrival: str, rate_rps: float, cv: float, count: int, rng: np.random.Generator
) -> np.ndarray:
    """``count`` gaps between arrivals, in seconds, with mean ``1 / rate_rps``.

    Poisson gaps are exponential (their cv is 1 whatever ``cv`` says); Gamma gaps have shape
    ``k = 1 / cv**2`` and scale ``1 / (rate * k)``, so mean ``1 / rate`` and the given cv.
    """
    mean_s = 1.0 / rate_rps
    if arrival == "poisson":
        return rng.exponential(mean_s, count)
    if arrival == "gamma":
        shape = 1.0 / cv**2
        return rng.gamma(shape, mean_s / shape, count)
    raise ValueError(f"arrival must be one of {ARRIVALS}, got {arrival!r}")


def arrival_times_s(config: TrafficConfig, rng: np.random.Generator) -> np.ndarray:
    """Send times within ``duration_s``, at most ``max_requests`` of them, ascending."""
    chunk = max(16, int(config.rate_rps * config.duration_s * 1.2) + 16)
    times: list[np.ndarray] = []
    last_s, count = 0.0, 0
    while last_s <= config.duration_s and count < config.max_requests:
        gaps = inter_arrival_s(config.arrival, config.rate_rps, config.cv, chunk, rng)
        block = last_s + np.cumsum(gaps)
        times.append(block)
        last_s, count = float(block[-1]), count + len(block)
    out = np.concatenate(times)
    return out[out <= config.duration_s][: config.max_requests]


def popularity(kind: str, num_adapters: int, zipf_s: float = 1.1) -> np.ndarray:
    """Probability of each adapter index, non-increasing in the index, summing to 1."""
    if num_adapters < 1:
        raise ValueError(f"num_adapters must be >= 1, got {num_adapters}")
    if kind == "uniform":
        weights = np.ones(num_adapters)
    elif kind == "zipf":
        weights = 1.0 / np.arange(1, num_adapters + 1, dtype=np.float64) ** zipf_s
    else:
        raise ValueError(f"popularity must be one of {POPULARITIES}, got {kind!r}")
    return weights / weights.sum()


def load_corpus(name: str, max_chars: int | None = None) -> list[str]:
    """The non-empty texts of a packaged corpus, each cut to ``max_chars`` characters."""
    from training import load_bbc_news, load_sms_spam, load_tweets

    loaders = {"sms": load_sms_spam, "tweets": load_tweets, "news": load_bbc_news}
    if name not in loaders:
        raise ValueError(f"corpus must be one of {CORPORA}, got {name!r}")
    if max_chars is not None and max_chars < 1:
        raise ValueError(f"max_chars must be >= 1, got {max_chars}")
    if name == "news":  # the loader cuts articles itself (and needs a limit)
        texts = [e.text for e in load_bbc_news(max_chars or DEFAULT_MAX_CHARS["news"])]
    else:
        texts = [e.text for e in loaders[name]()]
    texts = [t.strip()[:max_chars] if max_chars else t.strip() for t in texts]
    return [t for t in texts if t]


def schedule(
    config: TrafficConfig, texts: Sequence[str], rng: np.random.Generator
) -> list[Arrival]:
    """The whole open-loop schedule: send times, adapters by popularity, texts at random."""
    if not texts:
        raise ValueError("the corpus has no texts")
    times = arrival_times_s(config, rng)
    probs = popularity(config.popularity, config.num_adapters, config.zipf_s)
    adapters = rng.choice(config.num_adapters, size=len(times), p=probs)
    picks = rng.integers(0, len(texts), size=(len(times), config.inputs_per_request))
    return [
        Arrival(float(t), int(a), tuple(texts[i] for i in row))
        for t, a, row in zip(times, adapters, picks, strict=True)
    ]
