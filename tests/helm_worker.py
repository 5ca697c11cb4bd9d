"""Helm's Go SDK (``helm_python``) in a process of its own, for ``tests/test_helm.py``.

Loaded into pytest's process, the Go runtime crashed it mid-suite (SIGSEGV in ``runtime.pcvalue`` while
unwinding a stack on Python's main thread, next to torch, OpenVINO and ONNX Runtime's threads). Here it
shares a process with nothing else. Protocol: one JSON request per line on stdin, one JSON answer per
line on stdout: ``{"op": "render"|"lint", ...}`` → ``{"ok": result}`` or ``{"error": class, "message": ...}``.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import helm_python as helm


def answer(request: dict[str, Any]) -> Any:
    if request["op"] == "render":
        chart = helm.Chart.load(request["chart"])
        return chart.render(request["values"], name=request["name"], namespace=request["namespace"])
    if request["op"] == "lint":
        return helm.lint(request["chart"], request["values"], **request.get("options", {}))
    raise ValueError(f"unknown op {request['op']!r}")


def main() -> None:
    for line in sys.stdin:
        try:
            text = json.dumps({"ok": answer(json.loads(line))})
        except Exception as e:  # every failure goes back to the test, typed by its class name
            text = json.dumps({"error": type(e).__name__, "message": str(e)})
        sys.stdout.write(text + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
