"""Closing a listening TCP socket without resetting a connection the kernel already accepted (Linux).

The kernel resets a listening socket's backlog when its last descriptor is closed, and keeps completing
handshakes until then. ``gateway.gunicorn_conf``'s worker stop uses these pieces: whether another process
still holds the socket (``held_elsewhere``), a socket filter that drops new handshakes
(``refuse_new_connections``), and how long to keep accepting after it (``HANDSHAKE_SETTLE_S``). No side
effects on import (``gunicorn_conf`` sets the metrics folder when imported; tests import this instead).
"""

from __future__ import annotations

import ctypes
import os
import socket
from typing import Any

# Once new SYNs are dropped, the last worker keeps accepting this long before it empties the backlog and
# closes: far longer than a handshake's round trip (on loopback or inside a cluster), so no handshake that
# was under way completes after the close (it would be reset).
HANDSHAKE_SETTLE_S = 0.25

SO_ATTACH_FILTER = 26  # Linux, <asm-generic/socket.h>


class _BpfInstruction(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_ushort),
        ("jt", ctypes.c_ubyte),
        ("jf", ctypes.c_ubyte),
        ("k", ctypes.c_uint32),
    ]


class _BpfProgram(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_BpfInstruction))]


# Classic BPF over the TCP header of each segment the listening socket receives: drop a SYN without ACK (a
# new handshake), pass everything else (the ACK that completes a handshake under way, whose client already
# counts itself connected).
_DROP_NEW_SYNS = (
    (0x30, 0, 0, 13),  # ldb [13]: the TCP flags
    (0x45, 2, 0, 0x10),  # jset ACK -> pass
    (0x45, 0, 1, 0x02),  # jset SYN -> drop, else pass
    (0x06, 0, 0, 0),  # drop
    (0x06, 0, 0, 0xFFFFFFFF),  # pass
)


def refuse_new_connections(listener: Any) -> bool:
    """Make the kernel drop new handshakes on a listening TCP socket (Linux); ``False`` where it cannot.

    A dropped SYN is retransmitted by its client, which is refused once the socket is closed."""
    if getattr(listener, "family", None) not in (socket.AF_INET, socket.AF_INET6):
        return False  # a unix socket has no handshake: nothing to drop
    instructions = (_BpfInstruction * len(_DROP_NEW_SYNS))(*(_BpfInstruction(*i) for i in _DROP_NEW_SYNS))
    program = _BpfProgram(len(_DROP_NEW_SYNS), instructions)
    try:
        listener.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, bytes(program))
    except OSError:
        return False
    return True


def held_elsewhere(listener: Any) -> bool | None:
    """Whether another process has this socket open (``None``: cannot tell, e.g. without /proc).

    The kernel resets a listening socket's backlog only when its last descriptor is closed."""
    try:
        target = f"socket:[{os.fstat(listener.fileno()).st_ino}]"
        pids = [int(name) for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return None
    me = os.getpid()
    for pid in pids:
        if pid == me:
            continue
        try:
            fds = os.scandir(f"/proc/{pid}/fd")
        except OSError:
            continue  # gone, or not ours to read (gunicorn's processes run as one user)
        with fds:
            for fd in fds:
                try:
                    if os.readlink(fd.path) == target:
                        return True
                except OSError:
                    continue
    return False
