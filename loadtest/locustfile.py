"""Locust users and load shapes of the fashion tagger: the gateway over HTTP, Triton directly over gRPC.

Self-contained on purpose: the Helm chart mounts this one file into the stock ``locustio/locust`` image,
which has neither this project nor tritonclient, numpy or Pillow. Only ``TritonGrpcUser`` needs those,
and it imports them when a user of that class starts.

Run it with ``fashion loadtest`` (which prepares a pool of real JPEGs and the reports), or by hand::

    FASHION_LOADTEST_IMAGES=pool/images locust -f loadtest/locustfile.py --headless \
        -u 16 -r 4 -t 60s --host http://localhost:8080 GatewayUser

Users (pick by class name on the command line; both by default):

- ``GatewayUser`` posts JPEGs to ``/v1/predict`` (one image, multipart field ``image``) and
  ``/v1/predict/batch`` (``FASHION_LOADTEST_BATCH`` images, field ``images``), in the ratio of
  ``FASHION_LOADTEST_PREDICT_WEIGHT`` : ``FASHION_LOADTEST_BATCH_WEIGHT`` (9 : 1).
- ``TritonGrpcUser`` decodes the same JPEGs with ``fashion.contract`` and calls Triton's gRPC API at
  ``FASHION_TRITON_GRPC`` (``host:port``), reporting request type ``grpc``. The time it reports
  includes that client-side decoding, so its latency and the gateway's answer the same question (JPEG
  bytes in, probabilities out) and their difference is what the gateway adds.

Environment:

- ``FASHION_LOADTEST_IMAGES``: folder of ``*.jpg``/``*.jpeg``/``*.png`` (searched recursively, at most
  ``FASHION_LOADTEST_POOL_MAX`` = 256 files). Unset: one embedded catalogue photo.
- ``FASHION_API_KEY``: sent as ``Authorization: Bearer <key>`` when set.
- ``FASHION_LOADTEST_SHAPE``: ``users`` (default: plain ``-u``/``-r``/``-t``), ``step`` (add
  ``FASHION_LOADTEST_STEP_USERS`` users every ``FASHION_LOADTEST_STEP_S`` seconds up to ``-u``; or, when
  ``FASHION_LOADTEST_STAGES`` is set, follow its ``seconds:users`` stages, e.g. ``20:4,40:64,30:4`` for a
  spike past capacity and back, each capped at ``-u``) or ``constant`` (``-u`` users together sending
  ``FASHION_LOADTEST_RPS`` requests per second).
- ``FASHION_LOADTEST_RETRY_AFTER``: ``1`` makes ``GatewayUser`` polite: after a 429 or 503 it waits what
  ``Retry-After`` asks plus a jittered share of a window that doubles with each refusal in a row
  (``gateway.retry.Backoff``'s rule, copied in ``backoff_s``); default ``0``: it resends at once (the worst
  case, as many real clients do).
- ``FASHION_LOADTEST_RECORD``: a CSV path; every request is written there at the end (time, type, name,
  milliseconds, ok, HTTP status), so that ``fashion loadtest`` can report the latency of the successful
  requests beside all of them, and the goodput.
- ``FASHION_TRITON_GRPC``, ``FASHION_MODEL_NAME`` (``fashion``), ``FASHION_MODEL_VERSION`` (latest),
  ``FASHION_MODEL_REPOSITORY`` (read for the version's ``metadata.json`` preprocessing contract when
  reachable; otherwise the contract's defaults at the input size Triton reports).
"""

from __future__ import annotations

import base64
import csv
import functools
import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

from locust import HttpUser, LoadTestShape, User, events, task

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
SHAPES = ("users", "step", "constant")

# A synthetic catalogue photo (training.synth, 177x256, 3.6 KB), used when no pool folder is given.
_FALLBACK_JPEG = """
/9j/4AAQSkZJRgABAQAAAQABAAD/2wBDAAgGBgcGBQgHBwcJCQgKDBQNDAsLDBkSEw8UHRofHh0aHBwgJC4nICIsIxwcKDcpLDAx
NDQ0Hyc5PTgyPC4zNDL/2wBDAQkJCQwLDBgNDRgyIRwhMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIy
MjIyMjIyMjL/wAARCAEAALEDASIAAhEBAxEB/8QAHwAAAQUBAQEBAQEAAAAAAAAAAAECAwQFBgcICQoL/8QAtRAAAgEDAwIEAwUF
BAQAAAF9AQIDAAQRBRIhMUEGE1FhByJxFDKBkaEII0KxwRVS0fAkM2JyggkKFhcYGRolJicoKSo0NTY3ODk6Q0RFRkdISUpTVFVW
V1hZWmNkZWZnaGlqc3R1dnd4eXqDhIWGh4iJipKTlJWWl5iZmqKjpKWmp6ipqrKztLW2t7i5usLDxMXGx8jJytLT1NXW19jZ2uHi
4+Tl5ufo6erx8vP09fb3+Pn6/8QAHwEAAwEBAQEBAQEBAQAAAAAAAAECAwQFBgcICQoL/8QAtREAAgECBAQDBAcFBAQAAQJ3AAEC
AxEEBSExBhJBUQdhcRMiMoEIFEKRobHBCSMzUvAVYnLRChYkNOEl8RcYGRomJygpKjU2Nzg5OkNERUZHSElKU1RVVldYWVpjZGVm
Z2hpanN0dXZ3eHl6goOEhYaHiImKkpOUlZaXmJmaoqOkpaanqKmqsrO0tba3uLm6wsPExcbHyMnK0tPU1dbX2Nna4uPk5ebn6Onq
8vP09fb3+Pn6/9oADAMBAAIRAxEAPwD3uiiipKCiiigAooooAKKKKACiiigAooooAKKKKACiiigAooooAKKKKACiiigAooooAKKK
KACiiigAooooAKKKKACiiigAooooAKKKKACiiigAooooAKKKKACiiigAooooAKKKKACiiigAooooAKKKKACiiigAooooAKKKKACi
iigAooooAKKKKACiiigAooooAKKM0ZoAKKM0ZoAKKM0ZoAKKM0ZoAKKM0ZoAKKM0ZoAKKM0ZoAKKM0ZoAKKM0ZoAKKM0ZoAKKM0Z
oAKKM0UAJRRRTAKKKKACiiigAooooAKKKKACiiigAooooAKKKKACiiigAooooAKKKKACiiigAooopAFUtU1fTtFtDd6newWkA43y
uBk+g9T7CrteCfF68GofEGCxJ3w2FopKHkB3JJ/TbUzlyxudODwzxNZUk9zodY+MZupXtfC9mjDp9vvzsjHuqdT+P5Vn23xR8T6W
f9NXSdZhHVoHMMn+H6VwsdtI9vJMgGyLG7npn2qKuR4iVz6uGRYZR5W7nsmmfGfwzd4TUFu9Ll7/AGiIsn/fS5/UCu303WdL1iLz
NN1C1u16/uZQxH1A5FfMZAYYYAj0NQfYoVlEsO+CUdJIWKEflVRxPdHJW4dW9KX3n1jRXznpHj/xfoRCxakNStwc+Tfjecez9f1r
v9G+NWjXJSHW7O40qY8GTHmxE/Ucj8q3jVjLZni4jLMTQ+KOnkem0VU07VLDV7YXGnXsF3Cf44ZAwH1x0/GrdaHA1bcKKKKACiii
gAooooAKKKKACiiigAooooAKKKKADvXzLrEs+u+Mtf1OGGSWN7tokZFLDanyj9AK+jdYu20/RNQvUGWt7aSUD1KqT/SvA/CWqafY
eHIEmuQJpGaWT5WPJP09MVjXtazPZyVSjVdSKvYr2FldC0vI3tpV8yP5NyEZI7VTGk6ixwLKfPumK61tZsbuRYoJi8mdw+UgcfWm
nxLpgz+9kOO3lmuXlj3PpViKybahv6nL/wBi6n/z5S/kKcug6owyLRh9WA/rXR/8JTpv/Tb/AL9//XpreKtPB4Sdvog/xpcsO5Xt
8T/IV/C+kSWviK0k1TTEmsy21xIQQuejYzzg1b8UeBbuLxNJDYxRfY7tw8O9wqruPK/QH9MVGfFdjj/VXB/4CP8AGupHijTtZ8Fy
XU0qw3Vi20JI4DyccY9cj9RWkVBx5Thr1cXTrRrKOj91rprs7X7nA3HgXWdD1WT7HcNZ3MZ+We2nMe4dj9K6fSPiN4k8L7YfFdq2
o2BP/H9b48yP/eAwD+n1Naza3F4j8JyarbQPJe6d8s8WQGZP735c/gajvdWt9Z8HrrtpZhpLX9zd26kDavrj06H6H2rSL5dmcFaD
rpKrTSd+VtaWfT7+h6Jo+uaZ4gsFvdKvIrqA9Sh5U+jDqD7GtCvl83smn6iupeHWl0m8B+YRSZjf2K4x+HT2r0rwv8ZrScrZeKYB
p9zji6jBML/Uclf1H0rSFWMjz8XlVfD+9a6PVqKzLDxHomqAfYdXsbgnoI7hSfyzmtPFanmNNbhRRRQAUUUUAFFFFABRRRQAUUUU
AZ+uxLP4d1OJs7XtJVOOuChr5b0wltNgJ/u/1r6q1ONpdJvY0GWe3kVR6kqa+YND0q+utIglgt2dORuBHUHmubEq6R9Fw9NRqTu7
aF3SX2apB7kj8xVa4Ty7mVP7rkfrWpaaHqcdzFKbUgI4Jyy5x+dPvNA1Ca9lkigBR2yCXArl5XY+m9tTU78y2MSitf8A4RnU/wDn
nH/38FPXwvqTDkQr9X/+tRyvsV9YpfzIxaK2x4V1DP3oB/wM/wCFP/4RO9/572/5n/Cjkl2F9ZpfzGZY6ne6b5/2K5kg8+PypChx
uX0rS8L+JJPDl5O5gFza3ERjmt2OA/HH+fQmnr4SuiPmuYR9ATTv+ERuP+fuH/vk1SU07oxqTwtSMoztZ7nPOQzsVUIpJIUHOB6U
1lVxhlDD0IzXTf8ACIP/AM/q/wDfs/405fCB/ivfyj/+vS5JF/W6Ft/zOPfT7SQ5MCg+q8H9Kt2d3qmmkHTta1G0xyFjuG2/l0rp
v+EQX/n9P/fv/wCvUn/CIwf8/cv/AHyKpKotjCpPBz+JJ/IqWfxG8baftxqsF8i/wXUC5I9Nwwf1rutC+NGlXJSDX7SXSrg8eaMy
QsfqOR+R+tcivhK1Gd1zMfoAKVvCNi6lWmmIPY7f8K1jUqLc8zEYHAVF7nuvyPdLO9tdQtlubK5huYG+7JC4ZT+IqevAYdOuPBdw
mt+HZJy0DbrizaT5LiP+IY9cV7fous2fiDR7bVLCTzLe4Tcvqp7qfQg8GumMuY+dxWFdB73RfoooqjlCiiigAooooAjuP+Pab/cb
+VeF+ArHUZ/CVvJb6bczxGSTEiFMH5j6sDXvBAIIIyDwRXm/whz/AMIQ687Uv51UdgMjgVMo8zsdeGxDoRlJK+36lVdJ1pydujXA
x/fkjX/2anf2Lrn/AECJP+/8X/xVei4PoaNrf3T+VL2K7m39q1P5V+P+Z59/wj+vf9A6L/wKX/ClXw5rz5/0O2TH9+66/kprv8H0
pGdUGXZVz/eOKPZIX9qVf5V+P+Zwf/CM69/z72X/AIFH/wCIp/8Awimuf3tO/wC/r/8AxNdv58P/AD2j/wC+xVf+1NOBx/aFp/3/
AE/xo9lEX9pV3sl9xyS+EtZb70+np9C7Z/QU7/hENX/5/LD/AL4eunl13R7fHnatYR7um65QZ/Woj4m0ADP9uab/AOBaf40eziH9
oYnp+Rgf8IbqP/QUtP8AwFb/AOLpy+DL0j59WhU/7Fqf6vWn/wAJt4V/6GLTP/Alf8ail8feEoSA/iLT8n+7Lu/lmj2cA+u4v+or
/IpjwXdZ51hcf9eg/wDiqf8A8IS3/QZn/wC/CVKfiL4OVST4hs+Bngk/0qv/AMLS8F/9ByP/AL8yf/E0ckBfW8Y//wBlf5Eq+CVw
fM1e7PpsjjX+hpw8EwgjOq3xHpiP/wCIqq/xU8Hq2E1OSUesVrKwH/jtMPxW8J4+S5vHbsi2UmWPoOKfLAPrGM8/uX+Rof8ACE2O
f+P/AFH/AL+p/wDE1jfCqIWGo+LdNiZzbW+qMsasenB5445wPyq1/wALQ0L/AJ9NZ/8ABe9VPhhK9zrXiq9W2uY7W71DzoZJ4jGX
BDEjB7jj86LRT0JnUrSpyVV9vzPS6KKKo4wooooAKKKKACvP4vhTZWpkWy17XrSF5Gk8m3vNiKSc8DFegUUWKjOUdmcEfhfbSEC4
8ReIp0H8D6gcZ9eBS/8ACqtJ/wCgnrn/AIMX/wAK7yilZFe2n3ODHwj8M/xpfO3dmvpMk+p5py/CPwkDmSymmHYS3crAf+PV3VFF
kHtqn8zOI/4VL4N/6BC/9/5f/iqnHwv8HBQP7BtOBjnd/wDFV2FFFkL2tT+Z/ecpF8NvCEJJXQLE5674938yal/4V74T/wChf03/
AMB1rpqKdkL2k+7MP/hDvDn/AEBNN/8AASP/AAqWHwvoduCItIsEz122sYz+la9FAuaXczRoGkggjTrPI/6d0/wqz/Z9p/zwj/74
H+FWaKBXZClpBGCEjCg9lAH8qd5EfofzqSigBnlr7/maURqGDYOR706igAooooAKKKKAEzRmiigQZozRRQAZozRRQAZozRRQAZoz
RRQAZozRRQAZozRRQAZozRRQAZozRRQAZozRRQAZozRRQAZooooAKKKKBhRRRQAUUUUAFFFFABRRRQAUUUUAFFFFABRRRQAUUUUA
FFFFABRRRQAUUUUAFFFFABRRRQAUUUUAFFFFABRRRQAUUUUAFFFFABRRRQAUUUUAFFFFABRRRQAUUUUAFFFFABRRRQAUUUUAFFFF
ABRRRQAUUUUAFFFFABRRRQAUUUUAFFFFABRRRQAUUUUAFFFFABRRRQAUUUUAFFFFABRRRQAUUUUAFFFFABRRRQAUUUUAFFFFABRR
RQAUUUUAJRRRQIKKKKACiiigAooooAKKKKACiiigAooooAKKKKACiiigAooooAKKKKACiiigD//Z
"""


@dataclass(frozen=True)
class Settings:
    """The locustfile's settings, read from ``FASHION_*`` variables when a test starts (not at import)."""

    images_dir: str = ""
    pool_max: int = 256
    api_key: str = ""
    batch_size: int = 8
    predict_weight: int = 9
    batch_weight: int = 1
    shape: str = "users"
    step_users: int = 2
    step_s: float = 10.0
    stages: tuple[tuple[float, int], ...] = ()  # (seconds, users) in order; () = the plain step ramp
    rps: float = 10.0
    retry_after: bool = False  # GatewayUser waits Retry-After (+ jittered back-off) after a 429/503
    record: str = ""  # CSV of every request, written when Locust quits
    triton_grpc: str = ""
    model_name: str = "fashion"
    model_version: str = ""
    model_repository: str = ""

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"FASHION_LOADTEST_SHAPE must be one of {SHAPES}, got {self.shape!r}")
        if self.batch_size < 1 or self.pool_max < 1 or self.step_users < 1:
            raise ValueError("FASHION_LOADTEST_BATCH, _POOL_MAX and _STEP_USERS must be at least 1")
        if self.predict_weight < 0 or self.batch_weight < 0 or self.predict_weight + self.batch_weight == 0:
            raise ValueError("FASHION_LOADTEST_PREDICT_WEIGHT/_BATCH_WEIGHT: non-negative, not both 0")
        if self.step_s <= 0 or self.rps <= 0:
            raise ValueError("FASHION_LOADTEST_STEP_S and FASHION_LOADTEST_RPS must be positive")
        if any(seconds <= 0 or users < 1 for seconds, users in self.stages):
            raise ValueError("FASHION_LOADTEST_STAGES: positive seconds and at least 1 user per stage")

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        env = dict(os.environ if env is None else env)
        get = env.get
        try:
            return cls(
                images_dir=get("FASHION_LOADTEST_IMAGES", ""),
                pool_max=int(get("FASHION_LOADTEST_POOL_MAX", "256")),
                api_key=get("FASHION_API_KEY", ""),
                batch_size=int(get("FASHION_LOADTEST_BATCH", "8")),
                predict_weight=int(get("FASHION_LOADTEST_PREDICT_WEIGHT", "9")),
                batch_weight=int(get("FASHION_LOADTEST_BATCH_WEIGHT", "1")),
                shape=get("FASHION_LOADTEST_SHAPE", "users") or "users",
                step_users=int(get("FASHION_LOADTEST_STEP_USERS", "2")),
                step_s=float(get("FASHION_LOADTEST_STEP_S", "10")),
                stages=_stages(get("FASHION_LOADTEST_STAGES", "")),
                rps=float(get("FASHION_LOADTEST_RPS", "10")),
                retry_after=get("FASHION_LOADTEST_RETRY_AFTER", "0").strip().lower() in ("1", "true", "yes"),
                record=get("FASHION_LOADTEST_RECORD", ""),
                triton_grpc=get("FASHION_TRITON_GRPC", ""),
                model_name=get("FASHION_MODEL_NAME", "fashion") or "fashion",
                model_version=get("FASHION_MODEL_VERSION", ""),
                model_repository=get("FASHION_MODEL_REPOSITORY", ""),
            )
        except ValueError as e:
            raise ValueError(f"bad load-test setting: {e}") from e


def _stages(text: str) -> tuple[tuple[float, int], ...]:
    """``"20:4,40:64,30:4"`` → ((20.0, 4), (40.0, 64), (30.0, 4))."""
    stages = []
    for part in (p.strip() for p in text.split(",")):
        if part:
            seconds, _, users = part.partition(":")
            stages.append((float(seconds), int(users)))
    return tuple(stages)


@functools.cache
def settings() -> Settings:
    return Settings.from_env()


@functools.cache
def image_pool() -> tuple[tuple[str, bytes], ...]:
    """(file name, bytes) of the pool's images; the embedded photo when no folder is set."""
    folder = settings().images_dir
    if not folder:
        return (("fallback.jpg", base64.b64decode("".join(_FALLBACK_JPEG.split()))),)
    paths = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise FileNotFoundError(f"FASHION_LOADTEST_IMAGES={folder} holds no .jpg/.jpeg/.png files")
    return tuple((p.name, p.read_bytes()) for p in paths[: settings().pool_max])


def _content_type(name: str) -> str:
    return "image/png" if name.lower().endswith(".png") else "image/jpeg"


def _wait_time(user: User) -> float:
    """A pending Retry-After back-off first; in the ``constant`` shape every user paces itself to
    ``rps / users`` requests per second; otherwise no wait."""
    backoff = getattr(user, "_fashion_backoff", 0.0)
    if backoff:
        setattr(user, "_fashion_backoff", 0.0)  # noqa: B010 (any User class)
        return backoff
    s = settings()
    if s.shape != "constant":
        return 0.0
    users = max(1, user.environment.runner.user_count if user.environment.runner else 1)
    period = users / s.rps
    last: float | None = getattr(user, "_fashion_last_start", None)
    now = time.monotonic()
    # Constant throughput: wait what is left of the period since this task started.
    delay = period if last is None else max(0.0, period - (now - last))
    setattr(user, "_fashion_last_start", now + delay)  # noqa: B010 (any User class)
    return delay


class GatewayUser(HttpUser):
    """A catalogue client of the gateway: mostly single photos, sometimes a batch."""

    wait_time = _wait_time

    def on_start(self) -> None:
        self.pool = image_pool()
        if settings().api_key:
            self.client.headers["Authorization"] = f"Bearer {settings().api_key}"

    @task
    def predict_or_batch(self) -> None:
        s = settings()
        if random.random() * (s.predict_weight + s.batch_weight) < s.predict_weight:
            self.predict()
        else:
            self.predict_batch()

    def predict(self) -> None:
        name, data = random.choice(self.pool)
        files = {"image": (name, data, _content_type(name))}
        with self.client.post("/v1/predict", files=files, name="/v1/predict", catch_response=True) as r:
            _check(r, lambda body: "predictions" in body)
            self._back_off(r)

    def predict_batch(self) -> None:
        size = settings().batch_size
        files = [("images", (n, d, _content_type(n))) for n, d in random.choices(self.pool, k=size)]
        with self.client.post(
            "/v1/predict/batch", files=files, name=f"/v1/predict/batch [{size}]", catch_response=True
        ) as r:
            _check(
                r,
                lambda body: (
                    len(body.get("results", [])) == size and all("predictions" in x for x in body["results"])
                ),
            )
            self._back_off(r)

    def _back_off(self, response) -> None:
        """With FASHION_LOADTEST_RETRY_AFTER=1, wait after a 429/503 as a polite client does."""
        if response.status_code not in (429, 503):
            self._fashion_refusals = 0
            return
        self._fashion_refusals = getattr(self, "_fashion_refusals", 0) + 1
        if settings().retry_after:
            try:
                retry_after = min(60.0, float(response.headers.get("Retry-After", "1")))
            except ValueError:
                retry_after = 1.0
            self._fashion_backoff = backoff_s(self._fashion_refusals, retry_after)


def backoff_s(attempt: int, retry_after_s: float, rng=random) -> float:
    """``gateway.retry.Backoff().delay_s`` (base 0.1 s, cap 5 s), copied: this file runs without the project
    (tests/test_loadtest.py checks that the two agree)."""
    return max(0.0, retry_after_s) + rng.uniform(0.0, min(5.0, 0.1 * 2 ** max(0, attempt - 1)))


def _check(response, ok) -> None:
    if response.status_code != 200:
        response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
        return
    try:
        body = response.json()
    except ValueError:
        response.failure("the answer is not JSON")
        return
    if not ok(body):
        response.failure(f"unexpected answer: {json.dumps(body)[:200]}")


class TritonGrpcUser(User):
    """Triton directly over gRPC: decode with the preprocessing contract, infer, report a ``grpc`` event."""

    wait_time = _wait_time

    def on_start(self) -> None:
        # lazy: the locustfile must load where only GatewayUser can run (the locust image: no numpy, fashion)
        import grpc.experimental.gevent as grpc_gevent
        import numpy as np
        import tritonclient.grpc as grpcclient

        from fashion.contract import Preprocessing, preprocess

        grpc_gevent.init_gevent()  # grpcio must yield to gevent, or one user blocks all the others
        s = settings()
        url = s.triton_grpc or (self.host or "").split("://")[-1]
        if not url:
            raise ValueError("TritonGrpcUser needs FASHION_TRITON_GRPC=host:port")
        self.np, self.grpcclient, self.preprocess = np, grpcclient, preprocess
        self.client = grpcclient.InferenceServerClient(url)
        meta = self.client.get_model_metadata(s.model_name, s.model_version, as_json=True)
        self.input_name = meta["inputs"][0]["name"]
        # A model that reads titles has a second input: this user sends the photo alone, i.e. zero ids.
        self.extra = [
            (i["name"], i["datatype"], [int(d) for d in i["shape"][1:]]) for i in meta["inputs"][1:]
        ]
        size = int(meta["inputs"][0]["shape"][1])
        self.outputs = [grpcclient.InferRequestedOutput(o["name"]) for o in meta["outputs"]]
        self.contract = _contract(s, Preprocessing, size)
        self.pool = image_pool()

    def on_stop(self) -> None:
        client = getattr(self, "client", None)
        if client is not None:
            client.close()

    @task
    def infer(self) -> None:
        s = settings()
        _, data = random.choice(self.pool)
        start = time.perf_counter()
        exception, length = None, 0
        try:
            array = self.preprocess(data, self.contract)[None]
            tensor = self.grpcclient.InferInput(self.input_name, list(array.shape), "UINT8")
            tensor.set_data_from_numpy(array)
            inputs = [tensor]
            for name, datatype, dims in self.extra:
                zeros = self.np.zeros(
                    [1, *dims], dtype=self.np.int64 if datatype == "INT64" else self.np.float32
                )
                inputs.append(self.grpcclient.InferInput(name, [1, *dims], datatype))
                inputs[-1].set_data_from_numpy(zeros)
            result = self.client.infer(
                s.model_name, inputs, model_version=s.model_version, outputs=self.outputs, client_timeout=30
            )
            length = sum(result.as_numpy(o.name()).nbytes for o in self.outputs)
        except Exception as e:  # reported as a failure, the user goes on
            exception = e
        self.environment.events.request.fire(
            request_type="grpc",
            name="triton infer",
            response_time=(time.perf_counter() - start) * 1000,
            response_length=length,
            exception=exception,
            context={},
        )


def _contract(s: Settings, preprocessing_cls, size: int):
    """The version's contract from ``metadata.json`` when the repository is readable, else defaults."""
    from fashion.metadata import (  # lazy: the locust image runs GatewayUser without fashion
        FILENAME,
        read_document,
        version_folders,
    )

    root = Path(s.model_repository) / s.model_name if s.model_repository else None
    if root is not None and root.is_dir():
        versions = version_folders(root)
        version = s.model_version or (str(versions[-1]) if versions else "")
        path = root / version / FILENAME
        if version and path.is_file():
            return preprocessing_cls.from_dict(read_document(path)["preprocessing"])
    return preprocessing_cls(image_size=size)


class FashionLoadShape(LoadTestShape):
    """``users`` (plain -u/-r/-t), ``step`` ramp or ``constant`` rate, chosen by FASHION_LOADTEST_SHAPE."""

    use_common_options = True  # reads -u, -r and -t

    def tick(self):
        options = self.runner.environment.parsed_options if self.runner else None
        users = int(getattr(options, "num_users", None) or 1)
        spawn_rate = float(getattr(options, "spawn_rate", None) or users)
        run_time = getattr(options, "run_time", None)
        elapsed = self.get_run_time()
        if run_time and elapsed >= run_time:
            return None
        s = settings()
        if s.shape == "step" and s.stages:
            end = 0.0
            for seconds, stage_users in s.stages:
                end += seconds
                if elapsed < end:
                    count = min(users, stage_users)
                    return count, max(spawn_rate, float(users))  # each stage starts (or ends) at once
            return None
        if s.shape == "step":
            step = int(elapsed // s.step_s) + 1
            return min(users, step * s.step_users), max(spawn_rate, float(s.step_users))
        return users, spawn_rate


# -- the per-request record (FASHION_LOADTEST_RECORD) -------------------------------------------------------
_records: list[tuple[float, str, str, float, int, str]] = []


@events.request.add_listener
def _record(request_type, name, response_time, response_length, response=None, exception=None, **kwargs):
    if settings().record:
        status = getattr(response, "status_code", "") if response is not None else ""
        _records.append((time.time(), request_type, name, response_time, int(exception is None), str(status)))


@events.quitting.add_listener
def _write_records(environment, **kwargs) -> None:
    path = settings().record
    if path:
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(("time", "type", "name", "ms", "ok", "status"))
            writer.writerows(_records)
