"""Process orchestration: everything that starts and stops the project's processes on this machine.

``process.ManagedProcess`` is the one launcher (own session, log file, readiness URL, deadline, graceful
stop, the parent-death signal); ``triton`` (the pip Triton), ``gateway`` (gunicorn) and ``naive`` (the
bench's baseline server) are built on it. ``serve`` is ``fashion serve``, the local stack, in two typed steps:
``provision`` (which model version serves, exported first if needed → ``ServedModel``) and ``supervise``
(the processes, kept running and always stopped); ``config`` holds its settings and errors, ``ports`` its
ports and who holds a busy one. Above ``export`` and ``training`` (``fashion serve`` exports or trains a model
when there is none), below ``loadtest``.
"""
