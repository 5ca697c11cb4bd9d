"""Hostile input: fuzzed image bytes and requests, then the real gunicorn gateway against huge, lying and slow
clients.

The fuzzing part is bounded and reproducible (hypothesis, ``derandomize=True``, no example database). The
server part starts the real pip Triton (the tiny colour model of ``tests/test_gateway_stack.py``) and the
gateway under gunicorn with its production configuration (``gateway/gunicorn_conf.py``), talks to it over
raw sockets, and checks that every answer is a 2xx or a 4xx in the JSON error shape (or a closed connection
for a client that never finishes its request), that the workers survive and that their memory stays bounded.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import select
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from fashion.contract import DecodeLimits, ImageError, Preprocessing, preprocess
from gateway import create_app
from gateway.config import GatewayConfig
from orchestration.process import peak_rss_mb
from tests.fixtures_gateway import FakeTriton, encode, solid, write_metadata

FUZZ = settings(
    max_examples=250,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# -- seeds: real files of every format a client may send (and GIF, which is refused) -----------------
def _photo(size: tuple[int, int] = (36, 28)) -> Image.Image:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    pixels[4:20, 6:22] = (200, 30, 40)
    return Image.fromarray(pixels)


def _seeds() -> dict[str, bytes]:
    photo = _photo()
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate
    rgba = photo.convert("RGBA")
    rgba.putalpha(128)
    palette = photo.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 0
    frames = [photo.convert("P"), photo.rotate(90).convert("P")]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:])
    return {
        "jpeg": encode(photo, "JPEG", quality=80),
        "jpeg-progressive-exif": encode(photo, "JPEG", progressive=True, exif=exif.tobytes()),
        "jpeg-cmyk": encode(photo.convert("CMYK"), "JPEG"),
        "jpeg-grey": encode(photo.convert("L"), "JPEG"),
        "png": encode(photo, "PNG"),
        "png-rgba-interlaced": encode(rgba, "PNG", interlace=1),
        "png-palette-transparent": encode(palette, "PNG"),
        "png-16bit": encode(
            Image.fromarray((np.arange(36 * 28).reshape(28, 36) * 60).astype(np.uint16)), "PNG"
        ),
        "webp": encode(photo, "WEBP", quality=70),
        "webp-lossless-alpha": encode(rgba, "WEBP", lossless=True),
        "gif-animated": gif.getvalue(),
    }


SEEDS = _seeds()
CONTRACTS = [
    Preprocessing(image_size=32, resize_mode="letterbox"),
    Preprocessing(image_size=24, resize_mode="center_crop", interpolation="bicubic", trim=24),
    Preprocessing(image_size=16, resize_mode="squash", interpolation="nearest"),
]
# Small limits keep every example fast; the limits themselves are checked in tests/test_gateway.py.
FUZZ_LIMITS = DecodeLimits(max_bytes=256 * 1024, max_pixels=1_000_000)


# -- mutations -----------------------------------------------------------------------------------------
def _set_png_size(data: bytes, width: int, height: int, fix_crc: bool) -> bytes:
    if data[:8] != b"\x89PNG\r\n\x1a\n" or len(data) < 33:
        return data
    ihdr = bytearray(data[8:33])
    ihdr[8:16] = struct.pack(">II", width, height)
    if fix_crc:
        ihdr[21:25] = struct.pack(">I", zlib.crc32(bytes(ihdr[4:21])))
    return data[:8] + bytes(ihdr) + data[33:]


def _set_jpeg_size(data: bytes, width: int, height: int) -> bytes:
    out = bytearray(data)
    for marker in (b"\xff\xc0", b"\xff\xc2"):
        at = out.find(marker)
        if at >= 0 and at + 9 <= len(out):
            out[at + 5 : at + 9] = struct.pack(">HH", height & 0xFFFF, width & 0xFFFF)
    return bytes(out)


def _set_gif_size(data: bytes, width: int, height: int) -> bytes:
    if not data.startswith(b"GIF8") or len(data) < 10:
        return data
    return data[:6] + struct.pack("<HH", width & 0xFFFF, height & 0xFFFF) + data[10:]


def _set_riff_size(data: bytes, size: int) -> bytes:
    if not data.startswith(b"RIFF") or len(data) < 8:
        return data
    return data[:4] + struct.pack("<I", size & 0xFFFFFFFF) + data[8:]


@st.composite
def mutated_images(draw: st.DrawFn) -> bytes:
    """A real image after a few truncations, byte flips, splices and lying size fields."""
    data = SEEDS[draw(st.sampled_from(sorted(SEEDS)))]
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["truncate", "flip", "splice", "delete", "header", "riff"]))
        n = len(data)
        if n == 0:
            break
        if kind == "truncate":
            data = data[: draw(st.integers(0, n - 1))]
        elif kind == "flip":
            at = draw(st.integers(0, n - 1))
            data = data[:at] + bytes([draw(st.integers(0, 255))]) + data[at + 1 :]
        elif kind == "splice":
            at = draw(st.integers(0, n))
            data = data[:at] + draw(st.binary(min_size=1, max_size=64)) + data[at:]
        elif kind == "delete":
            at = draw(st.integers(0, n - 1))
            data = data[:at] + data[at + draw(st.integers(1, 256)) :]
        elif kind == "header":
            side = st.one_of(st.integers(0, 70), st.integers(0, 0xFFFF), st.integers(0, 2**31))
            width, height = draw(side), draw(side)
            data = _set_png_size(data, width, height, draw(st.booleans()))
            data = _set_jpeg_size(data, width, height)
            data = _set_gif_size(data, width, height)
        else:
            data = _set_riff_size(data, draw(st.integers(0, 2**32 - 1)))
    return data


def assert_contract_outcome(data: bytes, pre: Preprocessing) -> str:
    """The contract's promise: a (size, size, 3) uint8 array, or an ``ImageError``; nothing else escapes.

    Pillow's warnings are allowed (they are log lines under gunicorn, ``captureWarnings``), not raised.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            out = preprocess(data, pre, FUZZ_LIMITS)
        except ImageError as e:
            return type(e).__name__
    assert isinstance(out, np.ndarray)
    assert out.dtype == np.uint8 and out.shape == (pre.image_size, pre.image_size, 3)
    return "ok"


def test_every_seed_image_decodes_except_the_gif():
    # The mutations start from images the contract accepts, so that fuzzing reaches the decoders.
    outcomes = {name: assert_contract_outcome(data, CONTRACTS[0]) for name, data in SEEDS.items()}
    assert outcomes.pop("gif-animated") == "UnsupportedImageFormat"
    assert set(outcomes.values()) == {"ok"}, outcomes


# Format signatures, so that arbitrary bytes reach the parsers behind them (Pillow opens any format it knows
# before the contract refuses the ones it does not accept).
MAGICS = [
    b"",
    b"\xff\xd8\xff\xe0",
    b"\xff\xd8\xff\xdb",
    b"\x89PNG\r\n\x1a\n",
    b"RIFF\x00\x01\x00\x00WEBPVP8 ",
    b"RIFF\x00\x01\x00\x00WEBPVP8L",
    b"GIF89a",
    b"BM",
    b"II*\x00",
    b"MM\x00*",
    b"8BPS",
    b"\x00\x00\x01\x00",
    b"P6\n",
]


@FUZZ
@given(
    data=st.tuples(st.sampled_from(MAGICS), st.binary(max_size=4096)).map(b"".join),
    pre=st.sampled_from(CONTRACTS),
)
def test_decoding_arbitrary_bytes_gives_an_array_or_an_image_error(data, pre):
    event(assert_contract_outcome(data, pre))


@FUZZ
@given(
    data=st.one_of(mutated_images(), st.sampled_from(sorted(SEEDS)).map(lambda k: SEEDS[k][:64])),
    pre=st.sampled_from(CONTRACTS),
)
def test_decoding_mutated_real_images_gives_an_array_or_an_image_error(data, pre):
    event(assert_contract_outcome(data, pre))


# -- fuzzing request parsing in the Flask app (FakeTriton: the gateway's own logic only) ---------------
@pytest.fixture(scope="module")
def fuzz_client(tmp_path_factory):
    repository = tmp_path_factory.mktemp("fuzz-repository")
    write_metadata(repository)
    config = GatewayConfig(model_repository=str(repository), max_image_bytes=64 * 1024, max_batch_images=3)
    return create_app(config, triton=FakeTriton()).test_client()


# Header values as a client can send them (latin-1, no control characters).
HEADER_TEXT = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=60
)
TOKEN = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=40)
CONTENT_TYPES = st.one_of(
    st.sampled_from(
        [
            "image/jpeg",
            "image/png",
            "image/webp",
            "image/gif",
            "application/json",
            "application/x-www-form-urlencoded",
            "text/plain; charset=utf-8",
            "multipart/mixed; boundary=x",
            "multipart/form-data",
            "multipart/form-data; boundary=",
            "IMAGE/JPEG; q=1",
        ]
    ),
    HEADER_TEXT,
)
PAYLOADS = st.one_of(
    st.sampled_from([SEEDS["jpeg"], SEEDS["png"], SEEDS["webp"], SEEDS["gif-animated"]]),
    mutated_images(),
    st.binary(max_size=512),
    st.text(max_size=64).map(str.encode),
    st.just(b"http://169.254.169.254/latest/meta-data/"),
)


@st.composite
def multipart_bodies(draw: st.DrawFn) -> tuple[str, bytes]:
    """(Content-Type, body): a multipart/form-data body with random boundary, names, filenames and
    parts, sometimes cut short or without its closing boundary."""
    boundary = draw(st.one_of(st.just("fuzz-boundary"), TOKEN))
    body = io.BytesIO()
    for _ in range(draw(st.integers(0, 5))):
        name = (
            draw(st.sampled_from(["image", "images", "top_k", "category", "x"]))
            if draw(st.integers(0, 4))
            else draw(HEADER_TEXT)
        )
        disposition = f'form-data; name="{name}"'
        if draw(st.booleans()):
            disposition += f'; filename="{draw(HEADER_TEXT)}"'
        head = f"--{boundary}\r\nContent-Disposition: {disposition}\r\n"
        if draw(st.booleans()):
            head += f"Content-Type: {draw(CONTENT_TYPES)}\r\n"
        body.write(head.encode("latin-1") + b"\r\n" + draw(PAYLOADS) + b"\r\n")
    if draw(st.integers(0, 3)):
        body.write(f"--{boundary}--\r\n".encode("latin-1"))
    data = body.getvalue()
    if data and not draw(st.integers(0, 3)):
        data = data[: draw(st.integers(0, len(data)))]
    declared = boundary if draw(st.integers(0, 3)) else draw(TOKEN)
    return f"multipart/form-data; boundary={declared}", data


QUERIES = st.one_of(
    st.just({}),
    st.dictionaries(
        st.sampled_from(["top_k", "category", "url"]),
        st.one_of(st.integers(-5, 100).map(str), HEADER_TEXT, st.sampled_from(["Tshirts", "Sarees", "3"])),
        max_size=3,
    ),
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=40),  # raw, %-garbage included
)


def assert_json_answer(response) -> dict:
    status = response.status_code
    assert 200 <= status < 500, (status, response.get_data()[:300])
    assert response.mimetype == "application/json", (status, response.mimetype)
    body = json.loads(response.get_data())
    if status >= 400:
        assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    return body


@FUZZ
@given(
    path=st.sampled_from(["/v1/predict", "/v1/predict/batch"]),
    request=st.one_of(
        multipart_bodies(),
        st.tuples(CONTENT_TYPES, PAYLOADS),
        st.tuples(st.sampled_from(["image/jpeg", "image/png", "image/webp"]), PAYLOADS),
    ),
    query=QUERIES,
    request_id=st.one_of(st.none(), HEADER_TEXT),
)
def test_fuzzed_requests_get_2xx_or_a_4xx_json_error(fuzz_client, path, request, query, request_id):
    content_type, body = request
    headers = {"Content-Type": content_type}
    if request_id is not None:
        headers["X-Request-ID"] = request_id
    response = fuzz_client.post(path, data=body, headers=headers, query_string=query)
    answer = assert_json_answer(response)
    event(f"{response.status_code} {answer['error']['code'] if 'error' in answer else ''}".strip())
    if response.status_code == 200:
        results = answer["results"] if path.endswith("batch") else [answer]
        assert all(("predictions" in r) != ("error" in r) for r in results), answer
    assert response.headers["X-Request-ID"]


# -- the real gunicorn gateway --------------------------------------------------------------------------
CLIENT_TIMEOUT_S = 3  # FASHION_CLIENT_TIMEOUT_S of the gateway under test
KEEPALIVE_S = 5  # gateway/gunicorn_conf.py
MIB = 1024 * 1024


@pytest.fixture(scope="module")
def gunicorn(colour_stack) -> Iterator[dict]:
    # 2 workers × (2 in-flight slots + 1 spare thread)
    overrides = {"workers": 2, "threads": 3, "timeout_s": 5, "client_timeout_s": CLIENT_TIMEOUT_S}
    with colour_stack.gateway("hostile", **overrides) as server:
        yield {"server": server, "port": server.port, "log": server.log_path}

@dataclass
class Outcome:
    """What a raw client got: the first response (``status`` None: the connection closed without one), and
    for a client that read its connection to the end, every response on it (``responses``) and whether the
    gateway closed it (``closed``)."""

    status: int | None
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    seconds: float = 0.0
    sent_everything: bool = True
    responses: list[tuple[int, dict[str, str], bytes]] = field(default_factory=list)
    closed: bool | None = None

    def check(self) -> None:
        """Each response a 2xx/4xx in the JSON shape, or a closed connection; never a 5xx or an HTML page."""
        if self.status is None:
            return
        for status, headers, data in self.responses or [(self.status, self.headers, self.body)]:
            assert 200 <= status < 500, (status, data[:300])
            assert headers.get("content-type", "").startswith("application/json"), headers
            body = json.loads(data)
            if status >= 400:
                assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
            assert headers.get("x-request-id"), headers

    def codes(self) -> list[tuple[int, str]]:
        """(status, error code or "") of every response read."""
        return [
            (status, json.loads(data).get("error", {}).get("code", "")) for status, _, data in self.responses
        ]


def read_response(sock: socket.socket, timeout_s: float) -> tuple[int | None, dict[str, str], bytes]:
    """The first HTTP response on ``sock``, or (None, {}, b"") when it closes (or resets) before one."""
    sock.settimeout(timeout_s)
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return None, {}, b""
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers.get("content-length", "0"))
        while len(rest) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
        return status, headers, rest[:length]
    except (ConnectionResetError, BrokenPipeError):
        return None, {}, b""
    except TimeoutError as e:
        raise AssertionError(
            f"the gateway neither answered nor closed the connection in {timeout_s} s"
        ) from e


def parse_responses(data: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """Every whole HTTP response in ``data`` (what a connection carried), in order; a response cut short
    counts too (with the body it got)."""
    responses = []
    while b"\r\n\r\n" in data:
        head, _, data = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers.get("content-length", "0"))
        responses.append((int(lines[0].split()[1]), headers, data[:length]))
        data = data[length:]
    return responses


def read_to_the_end(sock: socket.socket, timeout_s: float) -> tuple[bytes, bool]:
    """Everything the server sends on ``sock`` until it closes it (True) or stays silent for ``timeout_s``
    (False: the connection is still open)."""
    sock.settimeout(timeout_s)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (ConnectionResetError, BrokenPipeError):
        pass
    except TimeoutError:
        return data, False
    return data, True


class _Answered(Exception):
    """The server answered (or hung up) before the whole request was sent."""


def exchange(
    port: int,
    head: bytes,
    body: Iterable[bytes] = (),
    *,
    half_close: bool = False,
    timeout_s: float = 30.0,
    to_the_end: bool = False,
) -> Outcome:
    """Send ``head`` then the body pieces, then read the first response (``to_the_end``: every response,
    until the gateway closes the connection or stays silent for ``timeout_s``). Like a good HTTP client, it
    stops sending as soon as the server answers (it never blocks in a send while an answer waits to be
    read)."""
    start = time.monotonic()
    sent_everything = True
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        try:
            for piece in itertools.chain([head], body):
                pending = memoryview(piece)
                while pending:
                    readable, writable, _ = select.select([sock], [sock], [], timeout_s)
                    if readable:
                        raise _Answered
                    if writable:
                        pending = pending[sock.send(pending) :]
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except (_Answered, BrokenPipeError, ConnectionResetError):
            sent_everything = False
        if to_the_end:
            data, closed = read_to_the_end(sock, timeout_s)
            responses = parse_responses(data)
            status, headers, body = responses[0] if responses else (None, {}, b"")
            seconds = time.monotonic() - start
            return Outcome(status, headers, body, seconds, sent_everything, responses, closed)
        status, headers, data = read_response(sock, timeout_s)
    return Outcome(status, headers, data, time.monotonic() - start, sent_everything)


def request_head(path: str, headers: dict[str, str], method: str = "POST") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"] + [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def repeat(piece: bytes, total: int) -> Iterator[bytes]:
    for _ in range(total // len(piece)):
        yield piece


def chunked(pieces: Iterable[bytes]) -> Iterator[bytes]:
    for piece in pieces:
        yield b"%x\r\n" % len(piece) + piece + b"\r\n"
    yield b"0\r\n\r\n"


def post_endpoints() -> list[str]:
    """Every POST route of the app (so that a new endpoint is covered without editing this test)."""
    with tempfile.TemporaryDirectory() as folder:
        write_metadata(Path(folder))
        app = create_app(GatewayConfig(model_repository=folder), triton=FakeTriton())
        rules = [r.rule for r in app.url_map.iter_rules() if "POST" in (r.methods or ()) and not r.arguments]
    return sorted(rules)


def workers_rss_mb(server) -> dict[int, float]:
    """Current resident memory (VmRSS, MiB) of each gunicorn worker."""
    found = {}
    for pid in server.worker_pids():
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                found[pid] = int(line.split()[1]) / 1024
    return found


def predict_ok(port: int, timeout_s: float = 30.0) -> tuple[int | None, float]:
    """One prediction as a well-behaved client makes it: a 429 is retried after its Retry-After (twice)."""
    image = solid((220, 30, 30), size=(40, 40))
    head = request_head("/v1/predict", {"Content-Type": "image/jpeg", "Content-Length": str(len(image))})
    start = time.monotonic()
    for _ in range(3):
        outcome = exchange(port, head, [image], timeout_s=timeout_s)
        if outcome.status != 429:
            break
        time.sleep(float(outcome.headers.get("retry-after", "1")))
    return outcome.status, time.monotonic() - start


# A second request carried where the first one's framing is ambiguous or broken: it must never be answered.
SMUGGLED = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
# Cases whose connection is read to the end (every response counted, until the gateway hangs up).
FRAMING_CASES = (
    "two Content-Lengths",
    "Content-Length and chunked",
    "Content-Length smaller than the body",
    "chunk size overflowing 64 bits",
    "not HTTP at all",
)

HOSTILE_CASES: dict[str, Callable[[int, str], Outcome]] = {
    "50 MB of JSON": lambda port, path: exchange(
        port,
        request_head(path, {"Content-Type": "application/json", "Content-Length": str(50 * MIB)}),
        repeat(b"[" * 65536, 50 * MIB),
    ),
    "100000 levels of nested JSON": lambda port, path: exchange(
        port,
        request_head(path, {"Content-Type": "application/json", "Content-Length": "200000"}),
        [b"[" * 100_000 + b"]" * 100_000],
    ),
    "50 MB of chunked image/jpeg": lambda port, path: exchange(
        port,
        request_head(path, {"Content-Type": "image/jpeg", "Transfer-Encoding": "chunked"}),
        chunked(repeat(b"\xff" * 65536, 50 * MIB)),
    ),
    "50 MB of chunked multipart": lambda port, path: exchange(
        port,
        request_head(
            path, {"Content-Type": "multipart/form-data; boundary=b", "Transfer-Encoding": "chunked"}
        ),
        chunked(
            itertools.chain(
                [b'--b\r\nContent-Disposition: form-data; name="images"; filename="x.jpg"\r\n\r\n'],
                repeat(b"\xff" * 65536, 50 * MIB),
            )
        ),
    ),
    "Content-Length larger than the body, then half-close": lambda port, path: exchange(
        port,
        request_head(path, {"Content-Type": "image/jpeg", "Content-Length": "100000"}),
        [b"\xff\xd8\xff" * 100],
        half_close=True,
    ),
    "Content-Length larger than the body, then stall": lambda port, path: exchange(
        port,
        request_head(path, {"Content-Type": "image/jpeg", "Content-Length": "100000"}),
        [b"\xff\xd8\xff" * 100],
    ),
    "Content-Length smaller than the body": lambda port, path: exchange(
        port,
        request_head(path, {"Content-Type": "image/jpeg", "Content-Length": "10"}),
        [SEEDS["jpeg"] + SMUGGLED],
        to_the_end=True,
    ),
    "negative Content-Length": lambda port, path: exchange(
        port, request_head(path, {"Content-Type": "image/jpeg", "Content-Length": "-5"}), [b"x" * 5]
    ),
    "non-numeric Content-Length": lambda port, path: exchange(
        port, request_head(path, {"Content-Type": "image/jpeg", "Content-Length": "12abc"}), [b"x" * 5]
    ),
    "two Content-Lengths": lambda port, path: exchange(
        port,
        request_head(path, {"Content-Type": "image/jpeg", "Content-Length": "5", "content-length": "7"}),
        [b"x" * 7 + SMUGGLED],
        to_the_end=True,
    ),
    "Content-Length and chunked": lambda port, path: exchange(
        port,
        request_head(
            path, {"Content-Type": "image/jpeg", "Content-Length": "5", "Transfer-Encoding": "chunked"}
        ),
        [b"5\r\nxxxxx\r\n0\r\n\r\n" + SMUGGLED],
        to_the_end=True,
    ),
    "bad chunk size (raw image)": lambda port, path: exchange(
        port,
        request_head(path, {"Content-Type": "image/jpeg", "Transfer-Encoding": "chunked"}),
        [b"zz\r\nxxxx\r\n0\r\n\r\n"],
    ),
    "bad chunk size (multipart)": lambda port, path: exchange(
        port,
        request_head(
            path, {"Content-Type": "multipart/form-data; boundary=b", "Transfer-Encoding": "chunked"}
        ),
        [b"10\r\n--b\r\nContent-Dis\r\n-1\r\n\r\n"],
    ),
    "chunk size overflowing 64 bits": lambda port, path: exchange(
        port,
        request_head(path, {"Content-Type": "image/jpeg", "Transfer-Encoding": "chunked"}),
        [b"ffffffffffffffffffff\r\nxxxx\r\n0\r\n\r\n" + SMUGGLED],
        half_close=True,
        to_the_end=True,
    ),
    "unknown transfer coding": lambda port, path: exchange(
        port, request_head(path, {"Content-Type": "image/jpeg", "Transfer-Encoding": "gzip"}), [b"x" * 10]
    ),
    "header over the size limit": lambda port, path: exchange(
        port,
        request_head(path, {"Content-Type": "image/jpeg", "X-Junk": "j" * 20_000, "Content-Length": "0"}),
    ),
    "request line over the limit": lambda port, path: exchange(
        port, request_head(path + "?" + "q" * 10_000, {"Content-Length": "0"})
    ),
    "not HTTP at all": lambda port, path: exchange(
        port, b"\x16\x03\x01\x02\x00" + bytes(range(256)) * 4 + b"\r\n\r\n" + SMUGGLED, to_the_end=True
    ),
}


@pytest.mark.parametrize("value", ["abc", "0", "-3"])
def test_a_bad_client_timeout_stops_the_gateway_at_start_up(value):
    # In a subprocess: importing gunicorn_conf sets PROMETHEUS_MULTIPROC_DIR for the process.
    done = subprocess.run(
        [sys.executable, "-c", "import gateway.gunicorn_conf"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "FASHION_CLIENT_TIMEOUT_S": value, "PROMETHEUS_MULTIPROC_DIR": "/tmp/unused"},
        cwd=Path(__file__).resolve().parents[1],
    )
    assert done.returncode != 0 and "FASHION_CLIENT_TIMEOUT_S" in done.stderr


@pytest.mark.server
def test_huge_nested_and_lying_requests_get_4xx_json_or_a_closed_connection(gunicorn):
    server, port = gunicorn["server"], gunicorn["port"]
    pids = sorted(server.worker_pids())
    rss_before = workers_rss_mb(server)
    endpoints = post_endpoints()
    assert {"/v1/predict", "/v1/predict/batch"} <= set(endpoints)
    jobs = [(name, path) for name in HOSTILE_CASES for path in endpoints]
    with futures.ThreadPoolExecutor(4) as pool:
        outcomes = dict(
            zip(jobs, pool.map(lambda job: HOSTILE_CASES[job[0]](port, job[1]), jobs), strict=True)
        )
    for (name, path), outcome in outcomes.items():
        try:
            outcome.check()
        except AssertionError as e:
            raise AssertionError(f"{name} on {path}: {e}") from e
    statuses = {job: o.status for job, o in outcomes.items()}
    by_case = {name: {statuses[(name, path)] for path in endpoints} for name in HOSTILE_CASES}
    # The answers a well-behaved server should give (None where closing is the honest answer).
    assert by_case["50 MB of JSON"] <= {413, 415}, by_case
    assert by_case["100000 levels of nested JSON"] == {415}, by_case
    assert by_case["50 MB of chunked image/jpeg"] <= {413, 415, None}, by_case
    assert by_case["negative Content-Length"] == {400}, by_case
    assert by_case["non-numeric Content-Length"] == {400}, by_case
    assert by_case["Content-Length and chunked"] == {400}, by_case
    assert by_case["unknown transfer coding"] == {400}, by_case
    assert by_case["header over the size limit"] == {431}, by_case
    assert by_case["request line over the limit"] == {414}, by_case
    assert by_case["bad chunk size (raw image)"] <= {400, 415}, by_case
    # Framing: read to the end of each connection. No smuggled request is ever answered, the gateway hangs
    # up, and a framing error is refused as one: 400 bad_request, by gunicorn's parser (Connection: close)
    # or by the app reading a body that breaks off. A refusal written while the client's unread bytes are
    # still queued can be lost to the reset that closing such a socket sends: then only the hang-up shows.
    refusal = (400, "bad_request")
    # What each endpoint answers a 10-byte image/jpeg body (or one it never reads: the batch endpoint wants
    # multipart).
    first_answer = {
        "/v1/predict": [(400, "undecodable_image")],
        "/v1/predict/batch": [(415, "unsupported_media_type")],
    }
    for (name, path), o in outcomes.items():
        if name not in FRAMING_CASES:
            continue
        case = f"{name} on {path}: {o.codes()}"
        assert o.closed, case
        assert not any(b'"ok"' in data for _, _, data in o.responses), case  # GET /healthz answered
        if name in ("two Content-Lengths", "Content-Length and chunked"):  # refused at the headers
            assert o.codes() == [refusal] and o.headers["connection"] == "close", case
        elif name == "Content-Length smaller than the body":  # 10 bytes, then what follows is no request
            assert o.codes() in (first_answer[path], first_answer[path] + [refusal]), case
        elif name == "chunk size overflowing 64 bits":  # the body breaks off (unless it is never read)
            assert o.codes() == ([refusal] if path == "/v1/predict" else first_answer[path]), case
        else:  # not HTTP at all
            assert o.codes() in ([], [refusal]), case
    stalled = [o for (name, _), o in outcomes.items() if name.endswith("then stall")]
    assert all(o.seconds < CLIENT_TIMEOUT_S + 15 for o in stalled), [o.seconds for o in stalled]
    # The workers survived, the gateway still answers, and its memory is bounded.
    assert predict_ok(port)[0] == 200
    assert sorted(server.worker_pids()) == pids
    rss_after = workers_rss_mb(server)
    peak = {pid: peak_rss_mb(pid) or 0.0 for pid in pids}
    print(f"\nworker memory (MiB): before {rss_before}, after {rss_after}, peak {peak}")
    growth = {pid: rss_after[pid] - rss_before[pid] for pid in pids}
    assert max(growth.values()) < 150, (rss_before, rss_after)
    # the peak includes the 50 MB body the batch endpoint buffers (it accepts up to FASHION_MAX_REQUEST_BYTES)
    assert max(peak.values()) < 500, peak
    log = gunicorn["log"].read_text(errors="replace")
    assert "Traceback" not in log and "internal_error" not in log


def trickle(port: int, at_once: bytes, slowly: bytes, plan_s: float) -> Outcome:
    """Send ``at_once``, then ``slowly`` one byte per second, until the server answers or hangs up (or
    ``plan_s`` passes: then the outcome says the client was never cut off)."""
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=plan_s + 30) as sock:
        sock.sendall(at_once)
        for i in range(len(slowly)):
            if time.monotonic() - start > plan_s:
                return Outcome(None, seconds=time.monotonic() - start, sent_everything=False)
            if select.select([sock], [], [], 1.0)[0]:
                break
            try:
                sock.sendall(slowly[i : i + 1])
            except (BrokenPipeError, ConnectionResetError):
                break
        status, headers, answer = read_response(sock, 10)
    return Outcome(status, headers, answer, time.monotonic() - start, sent_everything=False)


@pytest.mark.server
def test_slow_clients_are_cut_off_and_others_are_still_served(gunicorn):
    server, port = gunicorn["server"], gunicorn["port"]
    pids = sorted(server.worker_pids())
    plan_s = 60.0  # each slow client would go on this long
    slow_body = (
        request_head("/v1/predict", {"Content-Type": "image/jpeg", "Content-Length": "500"}),
        b"\xff" * 500,
    )
    slow_head = (
        b"",
        b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/jpeg\r\n" + b"X" * 200,
    )
    slow = [slow_body] * 4 + [slow_head] * 4  # 8 slow clients: more than the gateway's 2 workers x 3 threads
    with futures.ThreadPoolExecutor(len(slow)) as pool:
        slow_jobs = [pool.submit(trickle, port, at_once, slowly, plan_s) for at_once, slowly in slow]
        time.sleep(1.5)  # every thread is now busy with a slow client
        served = [predict_ok(port, timeout_s=45) for _ in range(6)]
        slow_outcomes = [job.result() for job in slow_jobs]
    assert [status for status, _ in served] == [200] * 6, served
    for outcome in slow_outcomes:
        outcome.check()
    # the slow bodies get a 400 (what they sent is not an image; or a 429 when they all reach the in-flight
    # slots at once), the slow headers a closed connection
    assert {o.status for o in slow_outcomes[:4]} <= {400, 429}, slow_outcomes
    assert [o.status for o in slow_outcomes[4:]] == [None] * 4, slow_outcomes
    # cut off after the client timeout (later ones wait for a thread first), long before plan_s
    assert max(o.seconds for o in slow_outcomes) < 4 * CLIENT_TIMEOUT_S + 10, slow_outcomes
    assert sorted(server.worker_pids()) == pids


@pytest.mark.server
def test_many_idle_connections_neither_block_others_nor_stay_open(gunicorn):
    server, port = gunicorn["server"], gunicorn["port"]
    pids = sorted(server.worker_pids())
    rss_before = workers_rss_mb(server)
    idle: list[socket.socket] = []
    try:
        for i in range(200):
            sock = socket.create_connection(("127.0.0.1", port), timeout=30)
            if i % 2:  # a kept-alive connection after one answered request
                sock.sendall(request_head("/healthz", {}, method="GET"))
                assert read_response(sock, 30)[0] == 200
            idle.append(sock)
        served = [predict_ok(port, timeout_s=30) for _ in range(6)]
        assert [status for status, _ in served] == [200] * 6, served
        assert statistics.median(seconds for _, seconds in served) < KEEPALIVE_S, served
        # The gateway closes idle connections after its keep-alive time.
        deadline = time.monotonic() + KEEPALIVE_S + 20
        open_ = list(idle)
        while open_ and time.monotonic() < deadline:
            readable, _, _ = select.select(open_, [], [], 1.0)
            for sock in readable:
                try:
                    if sock.recv(1) == b"":
                        open_.remove(sock)
                except ConnectionResetError:
                    open_.remove(sock)
        assert not open_, f"{len(open_)} idle connections still open"
    finally:
        for sock in idle:
            sock.close()
    assert sorted(server.worker_pids()) == pids
    rss_after = workers_rss_mb(server)
    assert max(rss_after[p] - rss_before[p] for p in pids) < 100, (rss_before, rss_after)
