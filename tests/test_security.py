"""Security: what the gateway logs, that it never fetches a URL a client sends (no SSRF), that uploads never
touch the disk, and a dependency audit against a documented allow-list.

The API-key checks themselves (constant-time comparison, open health endpoints, optional ``/metrics`` key)
are in ``tests/test_gateway.py``.
"""

from __future__ import annotations

import importlib.metadata
import io
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from gateway import create_app
from gateway.config import GatewayConfig
from tests.fixtures_gateway import FakeTriton, encode, solid, write_metadata

ROOT = Path(__file__).resolve().parents[1]
ALLOWLIST = ROOT / "security" / "pip-audit-allowlist.txt"


# -- a process-wide audit hook (PEP 578), switched on around the requests under test --------------------
_events: list[tuple[str, tuple[Any, ...]]] | None = None
_events_lock = threading.Lock()
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if _events is None:
        return
    if event in ("socket.connect", "socket.getaddrinfo", "urllib.Request", "http.client.connect"):
        _events.append((event, args))
    elif event == "open":
        path, mode, flags = (*args, None, None, None)[:3]
        writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & _WRITE_FLAGS
        )
        if writes and "__pycache__" not in str(path):  # a module imported for the first time
            _events.append((event, (path, mode, flags)))
    elif event in (
        "os.mkdir",
        "os.rename",
        "os.remove",
        "shutil.copyfile",
        "tempfile.mkstemp",
        "tempfile.mkdtemp",
    ):
        _events.append((event, args))


sys.addaudithook(_audit)


@contextmanager
def recorded_events() -> Iterator[list[tuple[str, tuple[Any, ...]]]]:
    """The network and disk-write events of this process while the block runs."""
    global _events
    with _events_lock:
        _events = found = []
        try:
            yield found
        finally:
            _events = None


@pytest.fixture
def app_client(tmp_path: Path):
    write_metadata(tmp_path)
    return create_app(GatewayConfig(model_repository=str(tmp_path)), triton=FakeTriton()).test_client()


class _Recorder(BaseHTTPRequestHandler):
    seen: list[str] = []

    def do_GET(self) -> None:  # a fetch of the "metadata service" would land here
        _Recorder.seen.append(self.path)
        self.send_response(200)
        self.end_headers()
        self.wfile.write(encode(Image.new("RGB", (32, 32), (220, 30, 30))))

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def metadata_service() -> Iterator[str]:
    """A local HTTP server standing in for http://169.254.169.254/: it serves an image to anyone who asks."""
    _Recorder.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/latest/meta-data/iam/security-credentials/"
    finally:
        server.shutdown()
        server.server_close()


def test_the_audit_hook_sees_connections_and_file_writes(tmp_path, metadata_service):
    # The two tests below rely on the hook: show that it catches what they look for.
    import urllib.request

    with recorded_events() as events:
        (tmp_path / "x.bin").write_bytes(b"x")
        urllib.request.urlopen(metadata_service, timeout=5).read()
    kinds = {event for event, _ in events}
    assert "open" in kinds and "socket.connect" in kinds
    assert _Recorder.seen == ["/latest/meta-data/iam/security-credentials/"]


def test_urls_in_a_request_are_bytes_never_fetched(app_client, metadata_service):
    urls = [metadata_service, "http://169.254.169.254/latest/meta-data/iam/security-credentials/"]
    with recorded_events() as events:
        for url in urls:
            raw = app_client.post("/v1/predict", data=url.encode(), content_type="image/jpeg")
            assert raw.status_code == 400 and raw.get_json()["error"]["code"] == "undecodable_image"
            part = app_client.post("/v1/predict", data={"image": (io.BytesIO(url.encode()), "x.jpg")})
            assert part.status_code == 400 and part.get_json()["error"]["code"] == "undecodable_image"
            field = app_client.post("/v1/predict", data={"image": url}, content_type="multipart/form-data")
            assert field.status_code == 400 and field.get_json()["error"]["code"] == "missing_image"
            for body in ({"image": url}, {"url": url}, {"images": [url]}):
                answer = app_client.post("/v1/predict", json=body)
                assert answer.status_code == 415
            batch = app_client.post(
                "/v1/predict/batch", data={"images": [(io.BytesIO(url.encode()), "a.jpg")]}
            )
            assert batch.status_code == 200
            assert batch.get_json()["results"][0]["error"]["code"] == "undecodable_image"
            # a URL in the query string next to a real image is ignored
            image = app_client.post(
                "/v1/predict",
                query_string={"url": url, "image": url},
                data=solid((1, 2, 3)),
                content_type="image/jpeg",
            )
            assert image.status_code == 200
    assert _Recorder.seen == []
    assert [e for e in events if e[0] != "open"] == [], events


def multipart_body(field: str, images: list[bytes], **fields: str) -> tuple[bytes, str]:
    """(body, Content-Type) built here, so that the test client has nothing to spool to disk itself."""
    out = io.BytesIO()
    for name, value in fields.items():
        out.write(f'--b0undary\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for i, data in enumerate(images):
        out.write(
            f'--b0undary\r\nContent-Disposition: form-data; name="{field}"; filename="{i}.jpg"\r\n'
            "\r\n".encode()
        )
        out.write(data + b"\r\n")
    out.write(b"--b0undary--\r\n")
    return out.getvalue(), "multipart/form-data; boundary=b0undary"


def test_uploads_are_never_written_to_disk(app_client, tmp_path, monkeypatch):
    # Werkzeug spools uploads over 500 KB to temporary files by default; the gateway's Request keeps them in
    # memory. Any file opened for writing during the requests (a temporary file included) fails the test.
    from flask import Request as FlaskRequest

    spool = tmp_path / "tmp"
    spool.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool))
    noise = np.random.default_rng(2).integers(0, 255, (900, 700, 3), dtype=np.uint8)
    photo = encode(Image.fromarray(noise), "JPEG", quality=95)
    assert len(photo) > 600_000
    single = multipart_body("image", [photo], top_k="2")
    batch = multipart_body("images", [photo] * 3)

    def send() -> list[int]:
        return [
            app_client.post("/v1/predict", data=single[0], content_type=single[1]).status_code,
            app_client.post("/v1/predict/batch", data=batch[0], content_type=batch[1]).status_code,
            app_client.post("/v1/predict", data=photo, content_type="image/jpeg").status_code,
        ]

    with recorded_events() as events:
        assert send() == [200, 200, 200]
    assert events == [], events
    assert list(spool.iterdir()) == []
    # The same requests with Flask's own Request class do write temporary files: the check can fail.
    monkeypatch.setattr(app_client.application, "request_class", FlaskRequest)
    with recorded_events() as events:
        assert send() == [200, 200, 200]
    assert any(event == "open" for event, _ in events)


# -- logs of the real gunicorn gateway --------------------------------------------------------------------
KEY = "sk-live-0123456789abcdef"
WRONG_KEY = "sk-live-wrong-key-987654"
MARKER = b"SECRET-PIXELS-7f3a9c"


@pytest.mark.server
def test_gateway_logs_have_request_ids_and_no_keys_or_image_bytes(colour_stack):
    from tests.test_gateway_stack import http, multipart

    # the marker in a JPEG comment and after the end-of-image marker
    photo = encode(Image.new("RGB", (40, 40), (220, 30, 30)), "JPEG", comment=MARKER) + MARKER
    assert MARKER in photo
    triton = colour_stack.triton()
    overrides = {"api_keys": f"{KEY},another-key", "workers": 1, "threads": 2, "timeout_s": 3}
    with colour_stack.gateway("security", **overrides) as server:
        log_path = server.log_path
        url = server.url
        bearer = {"Authorization": f"Bearer {KEY}", "Content-Type": "image/jpeg"}
        answers = {
            "ok": http("POST", url + "/v1/predict", photo, {**bearer, "X-Request-ID": "rid-ok-1"}),
            "x-api-key": http(
                "POST",
                url + "/v1/predict",
                photo,
                {"X-API-Key": KEY, "Content-Type": "image/jpeg", "X-Request-ID": "rid-ok-2"},
            ),
            "wrong key": http(
                "POST", url + "/v1/predict", photo, {**bearer, "Authorization": f"Bearer {WRONG_KEY}"}
            ),
            "undecodable": http("POST", url + "/v1/predict", MARKER * 50, bearer),
            "batch": http(
                "POST", url + "/v1/predict/batch", *_with(multipart("images", [photo, MARKER]), KEY)
            ),
        }
        # A body longer than its Content-Length: the rest (image bytes) is read as the next request line.
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            sock.sendall(
                b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                + f"Content-Length: 4\r\nAuthorization: Bearer {KEY}\r\n\r\n".encode()
                + photo
                + b"\r\n\r\n"
            )
            desync = sock.recv(65536)
        triton.stop()  # the next answer is a 503, which the gateway logs as a warning
        answers["triton down"] = http(
            "POST", url + "/v1/predict", photo, {**bearer, "X-Request-ID": "rid-triton-down"}
        )
    statuses = {name: status for name, (status, _, _) in answers.items()}
    assert statuses == {
        "ok": 200,
        "x-api-key": 200,
        "wrong key": 401,
        "undecodable": 400,
        "batch": 200,
        "triton down": 503,
    }, statuses
    assert desync.startswith(b"HTTP/1.1 400")
    log = log_path.read_text(errors="replace")
    lines = [line for line in log.splitlines() if line.strip()]
    assert lines, "gunicorn wrote no log"
    assert [line for line in lines if "rid=" not in line] == []
    for secret in (KEY, WRONG_KEY, MARKER.decode()):
        assert secret not in log, f"{secret!r} is in the gateway's log"
    # the request ids a client sent are in the access lines, and in the warning of the failed request
    assert any("rid=rid-ok-1" in line and " 200 " in line for line in lines), log[-3000:]
    assert any("rid=rid-triton-down" in line and "WARNING gateway" in line for line in lines), log[-3000:]
    assert any("rid=rid-triton-down" in line and "gunicorn.access" in line for line in lines), log[-3000:]
    assert "refused a malformed request" in log  # the desynchronised image bytes, named by class only


def _with(body_and_headers: tuple[bytes, dict], key: str) -> tuple[bytes, dict]:
    body, headers = body_and_headers
    return body, {**headers, "X-API-Key": key}


# -- dependency audit -----------------------------------------------------------------------------------
ALLOW_LINE = re.compile(
    r"^(?P<id>[A-Za-z0-9][A-Za-z0-9._:-]+)\s+#\s*"
    r"(?P<package>[^,]+),\s*(?P<why>.+),\s*(?P<date>\d{4}-\d{2}-\d{2})\s*$"
)


def read_allowlist(path: Path = ALLOWLIST) -> dict[str, str]:
    """``{vulnerability id: reason}`` from the allow-list (``ID  # package, why accepted, YYYY-MM-DD``)."""
    allowed: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = ALLOW_LINE.match(line.strip())
        if match is None:
            raise ValueError(
                f"{path}:{number}: expected 'VULN-ID  # package, why it is accepted, YYYY-MM-DD'"
            )
        date.fromisoformat(match["date"])
        allowed[match["id"]] = f"{match['package'].strip()}: {match['why'].strip()}"
    return allowed


def test_the_allow_list_is_well_formed():
    allowed = read_allowlist()
    assert all(reason for reason in allowed.values())


NETWORK_ERRORS = re.compile(
    r"ConnectionError|Max retries exceeded|NameResolution|Temporary failure in name resolution|timed out|"
    r"Network is unreachable|Connection refused|SSLError|ProxyError|ServiceError",
    re.IGNORECASE,
)


def unreachable(message: str) -> None:
    """No vulnerability data: a skip that says so, or a failure where ``FASHION_REQUIRE_AUDIT=1`` (set it in
    a CI that reaches pypi.org's JSON API; this project's own CI machines only reach a package mirror that
    does not serve ``/pypi/<name>/<version>/json``)."""
    if os.environ.get("FASHION_REQUIRE_AUDIT") == "1":
        pytest.fail(message)
    pytest.skip(f"NO AUDIT RAN: {message} (FASHION_REQUIRE_AUDIT=1 makes this a failure)")


VULNERABILITY_SERVICE = "https://pypi.org/pypi/{name}/{version}/json"  # what pip-audit asks per package


def probe_vulnerability_service(timeout_s: float = 10.0) -> str | None:
    """Why pypi.org's JSON API cannot answer, or None when it can: one lookup (pip-audit's own entry) before
    pip-audit makes ~170 of them, each of which would fail the same way."""
    url = VULNERABILITY_SERVICE.format(name="pip-audit", version=importlib.metadata.version("pip-audit"))
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            json.loads(response.read())
    except (OSError, ValueError) as e:  # URLError/HTTPError/timeouts are OSErrors; a non-JSON answer
        return f"{url} answered {e}"
    return None


def test_dependencies_have_no_known_vulnerabilities_outside_the_allow_list():
    """pip-audit over this environment (PyPI's vulnerability data); needs pypi.org's JSON API."""
    pip_audit = Path(sys.executable).with_name("pip-audit")
    if not pip_audit.exists():
        pytest.fail(f"pip-audit is not installed next to {sys.executable}: pip install -e '.[dev]'")
    if (why := probe_vulnerability_service()) is not None:
        unreachable(
            f"the vulnerability service (pypi.org's JSON API) cannot be reached or does not answer: {why}"
        )
    allowed = read_allowlist()
    command = [
        str(pip_audit),
        "--skip-editable",
        "--format",
        "json",
        "--progress-spinner",
        "off",
        "--timeout",
        "30",
        *(f"--ignore-vuln={vuln}" for vuln in sorted(allowed)),
    ]
    env = {**os.environ, "PIPAPI_PYTHON_LOCATION": sys.executable}
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    except subprocess.TimeoutExpired:
        unreachable("pip-audit did not finish in 600 s: is the vulnerability service (pypi.org) reachable?")
    try:
        report = json.loads(done.stdout)
    except json.JSONDecodeError:
        reason = (
            "the vulnerability service (pypi.org) cannot be reached"
            if NETWORK_ERRORS.search(done.stderr)
            else f"pip-audit failed (exit {done.returncode})"
        )
        if "cannot be reached" in reason:
            unreachable(f"{reason}; the audit did not run: {done.stderr[-500:]}")
        pytest.fail(f"{reason}; the audit did not run:\n{done.stderr[-3000:]}")
    dependencies = report.get("dependencies", [])
    audited = [dep for dep in dependencies if "skip_reason" not in dep]
    not_found = [dep for dep in dependencies if "not found on PyPI" in dep.get("skip_reason", "")]
    if len(not_found) > len(audited):
        # pip-audit then exits 0 ("No known vulnerabilities found"): it asks
        # pypi.org/pypi/<name>/<version>/json and counts a failed lookup as a skip, not as an error.
        unreachable(
            "the vulnerability service (pypi.org's JSON API) cannot be reached or does not answer: "
            f"pip-audit could look up {len(audited)} of {len(dependencies)} packages, e.g. "
            + "; ".join(dep["skip_reason"] for dep in not_found[:3])
        )
    findings = unaccepted(report, allowed)
    assert not findings, (
        "known vulnerabilities outside security/pip-audit-allowlist.txt (upgrade the package, or add a line "
        "with the reason and date):\n" + "\n".join(findings)
    )


def unaccepted(report: dict[str, Any], allowed: dict[str, str]) -> list[str]:
    """The findings of a ``pip-audit --format json`` report that the allow-list does not accept (by id or
    alias), one line each."""
    return [
        f"{dep['name']} {dep['version']}: {vuln['id']} (aliases {', '.join(vuln.get('aliases', [])) or '-'}; "
        f"fixed in {', '.join(vuln.get('fix_versions', [])) or 'no release yet'})"
        for dep in report.get("dependencies", [])
        for vuln in dep.get("vulns", [])
        if vuln["id"] not in allowed and not set(vuln.get("aliases", [])) & set(allowed)
    ]


def test_findings_outside_the_allow_list_are_reported_with_their_fix():
    report = {
        "dependencies": [
            {"name": "flask", "version": "3.1.3", "vulns": []},
            {
                "name": "requests",
                "version": "2.31.0",
                "vulns": [
                    {"id": "GHSA-9wx4-h78v-vm56", "aliases": ["CVE-2024-35195"], "fix_versions": ["2.32.0"]},
                    {"id": "PYSEC-2099-1", "aliases": [], "fix_versions": []},
                ],
            },
        ]
    }
    assert unaccepted(report, {}) == [
        "requests 2.31.0: GHSA-9wx4-h78v-vm56 (aliases CVE-2024-35195; fixed in 2.32.0)",
        "requests 2.31.0: PYSEC-2099-1 (aliases -; fixed in no release yet)",
    ]
    assert unaccepted(report, {"CVE-2024-35195": "x", "PYSEC-2099-1": "y"}) == []
