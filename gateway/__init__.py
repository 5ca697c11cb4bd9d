"""The HTTP gateway in front of Triton (Flask under gunicorn).

Production: ``gunicorn -c python:gateway.gunicorn_conf 'gateway:create_app()'``.

Torch-free and independent of ``training``/``export``: it reads the model's ``metadata.json`` and talks to
Triton. ``create_app`` is imported lazily so that ``gateway.client`` (the library for services that call
Triton themselves) and ``gateway.config`` work without Flask.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.app import create_app

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        # lazy: `import gateway.config` (gunicorn's config, the client) must not import Flask and the app
        from gateway.app import create_app

        return create_app
    raise AttributeError(f"module 'gateway' has no attribute {name!r}")
