"""The ports of the local stack: which are free, which process holds a busy one, and the four that
``fashion serve`` uses (``0`` = a free one).

``listeners(port)`` answers the operator's question after a crash ("what still holds 8080?") from
``/proc/net/tcp{,6}`` (the listening socket's inode) and ``/proc/<pid>/fd`` (who has that inode open), so
that the error names the process to stop instead of leaving its owner to guess.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from orchestration.process import command_line, free_ports

LISTEN = "0A"  # TCP state in /proc/net/tcp


@dataclass(frozen=True)
class Holder:
    """A process with a listening socket open."""

    pid: int
    command: tuple[str, ...]

    def describe(self, chars: int = 160) -> str:
        text = " ".join(" ".join(self.command).split()) or "(command line not readable)"
        return f"pid {self.pid} ({text[:chars]}{'...' if len(text) > chars else ''})"


def port_free(host: str, port: int) -> bool:
    """Whether a server could listen on ``host:port`` now (SO_REUSEADDR, as gunicorn and Triton bind)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _listening_inodes(port: int, proc: Path) -> set[str]:
    inodes = set()
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in (proc / "net" / table).read_text().splitlines()[1:]:
                fields = line.split()
                if len(fields) > 9 and fields[3] == LISTEN and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(fields[9])
    return inodes


def listeners(port: int, proc: Path = Path("/proc")) -> list[Holder]:
    """The processes that hold a socket listening on ``port`` (any address), lowest pid first; empty when
    none is visible to this user (or off Linux)."""
    inodes = {f"socket:[{inode}]" for inode in _listening_inodes(port, proc)}
    if not inodes:
        return []
    found = []
    for entry in sorted((p for p in proc.iterdir() if p.name.isdigit()), key=lambda p: int(p.name)):
        with contextlib.suppress(OSError):
            if any(os.readlink(fd) in inodes for fd in (entry / "fd").iterdir()):
                found.append(Holder(int(entry.name), tuple(command_line(int(entry.name)))))
    return found


def busy_message(host: str, port: int, flag: str) -> str:
    """Why ``port`` cannot be used and what to do: the process that holds it (pid and command line) when
    this user can see it, so that an orphan of an earlier stack can be stopped by its pid."""
    holders = listeners(port)
    if holders:
        more = holders[1:]
        by = f" by {holders[0].describe()}"
        if more:
            by += f" and {len(more)} more (pids {', '.join(str(h.pid) for h in more)})"
        stop = f"stop it (kill {holders[0].pid})"
    else:
        by, stop = "", "stop it"
    return (
        f"port {port} on {host} is already in use{by} (another `fashion serve`, an orphan of one that was "
        f"killed, or another server); {stop}, or choose another with {flag} N ({flag} 0 picks a free one)"
    )


@dataclass(frozen=True)
class Ports:
    """The stack's four ports, all resolved (no ``0``)."""

    gateway: int
    triton_http: int
    triton_grpc: int
    triton_metrics: int


def resolve_ports(wanted: Mapping[str, tuple[str, str, int]], busy: type[Exception]) -> Ports:
    """``wanted``: ``Ports`` field → (flag, host, port); ``0`` is replaced by a free port. A busy port raises
    ``busy`` naming its flag and the process that holds it."""
    for flag, host, port in wanted.values():
        if port and not port_free(host, port):
            raise busy(busy_message(host, port, flag))
    taken = {port for _, _, port in wanted.values() if port}
    # Bound on every address for a moment: a port free there is free on loopback and on --host.
    spare = iter(p for p in free_ports(8, "0.0.0.0") if p not in taken)
    return Ports(**{key: port or next(spare) for key, (_, _, port) in wanted.items()})
