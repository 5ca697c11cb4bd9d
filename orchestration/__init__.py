"""Process orchestration: everything that starts and stops the project's processes on this machine.

``process.ManagedProcess`` is the one launcher (own session, log file, readiness URL, deadline, graceful
stop); ``triton`` (the pip Triton), ``gateway`` (gunicorn) and ``naive`` (the bench's baseline server) are
built on it, and ``serve`` is ``fashion serve``, the local stack that keeps them running. Above ``export``
and ``training`` (``fashion serve`` exports or trains a model when there is none), below ``loadtest``.
"""
