"""Same-node transport of the actor engine: a step's vectors in shared memory, one Unix socket
per actor to start its part of a step and to hear that it is done.

Why: through Ray's task path a b = 25 step spends 15-25 ms in plumbing on a loaded 2-core
machine (every call and every result goes through the owner, the raylet and the object store:
BENCHMARKS.md, "Ray transport"), about the local engine's whole step. Ray's compiled graphs move
the data in 4-11 ms, but their readers spin (0.5-0.65 of a core each while idle). Here a reader
blocks in ``recv`` on a socket, which costs nothing while it waits and wakes in microseconds.

The run's server creates one anonymous shared-memory file (``memfd``) and hands its descriptor
to each actor over the actor's socket (``SCM_RIGHTS``: nothing is left behind in /dev/shm if a
process dies). Its layout, float32:

    theta [d] | rows[0] [n, d] | rows[1] [n, d] | means [A, 2, d]     (A: honest-worker actors)

At step t the server writes theta_t and sends ``("round", run, t, w, prev)`` to every
honest-worker actor: each writes its workers' submitted rows straight into ``rows[w]`` (the
GAR's input; honest rows first) and the means of its rows before noise ("sample") and as
submitted into its ``means`` rows, and answers with its per-worker scalars and the rows' spread
(the server combines the groups' moments for the VN ratios instead of reading the rows again). The Byzantine actor then reads the
honest rows there and writes its f rows below them (label flippers, who train, start at once).
``w`` alternates: the other buffer keeps step t - 1's rows untouched, and with momentum those
rows are the momentum buffers step t reads (``prev``). So the actors stay stateless between
steps and a step can be computed again exactly after a failure.

Anything unexpected on a channel (the actor died, did not answer within
``actors.step_timeout_s``, the connection broke) raises :class:`ChannelBroken`; the engine then
computes that step through Ray's object store, whose recovery restarts actors, and opens new
channels at the next step. Errors inside the step itself (a bug, bad input) come back as
:class:`ChannelError`, raised as they would be through Ray.
"""

from __future__ import annotations

import mmap
import os
import secrets
import select
import socket
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Connection, Listener
from multiprocessing.reduction import recvfds, sendfds
from typing import Any

import torch

FLOAT = torch.float32
_ITEM = 4  # bytes of a float32


class ChannelBroken(RuntimeError):
    """A channel can no longer be used (the actor died or hung, or the connection broke)."""


class ChannelError(RuntimeError):
    """The actor raised while computing its part of a step (the text is its traceback)."""


def supported() -> bool:
    """Shared memory by file descriptor over Unix sockets: Linux (``os.memfd_create``)."""
    return hasattr(os, "memfd_create") and hasattr(socket, "AF_UNIX")


@dataclass(frozen=True)
class Geometry:
    """Sizes of the shared file: ``d`` parameters, ``n`` workers, ``a`` honest-worker actors."""

    d: int
    n: int
    a: int

    @property
    def floats(self) -> int:
        return self.d * (1 + 2 * self.n + 2 * self.a)

    @property
    def nbytes(self) -> int:
        return max(self.floats * _ITEM, 1)


class SharedBuffers:
    """The views of a shared file: ``theta`` [d], ``rows`` (two [n, d]), ``means`` [a, 2, d]."""

    def __init__(self, fd: int, geometry: Geometry):
        self.geometry = geometry
        self._map = mmap.mmap(fd, geometry.nbytes)
        d, n, a = geometry.d, geometry.n, geometry.a
        flat = torch.frombuffer(self._map, dtype=FLOAT, count=geometry.floats)
        self.theta = flat[:d]
        self.rows = (flat[d:d + n * d].view(n, d), flat[d + n * d:d + 2 * n * d].view(n, d))
        self.means = flat[d + 2 * n * d:].view(a, 2, d)

    def close(self) -> None:
        self.theta = self.rows = self.means = None  # type: ignore[assignment]
        try:
            self._map.close()
        except BufferError:  # a view is still alive somewhere: the mapping goes with it
            pass


def create_shared(geometry: Geometry) -> tuple[int, SharedBuffers]:
    """A new anonymous shared file of ``geometry`` and this process's views of it."""
    fd = os.memfd_create("tuneguard-step", getattr(os, "MFD_CLOEXEC", 0))
    try:
        os.ftruncate(fd, geometry.nbytes)
        return fd, SharedBuffers(fd, geometry)
    except BaseException:
        os.close(fd)
        raise


# Actor side -------------------------------------------------------------------------------------

Handler = Callable[[SharedBuffers, dict[str, Any], tuple[int, int, bool]], Any]


class ChannelListener:
    """Inside an actor: accepts the servers' connections, one thread each. Every message after
    the opening one is ``handler(buffers, spec, (t, w, prev))`` under ``lock`` (the actor computes one
    thing at a time, whichever path asks), its return value the reply."""

    def __init__(self, handler: Handler, lock: threading.Lock):
        self.handler = handler
        self.lock = lock
        # Linux's abstract socket namespace: no file to clean up after a killed actor. Any local
        # process could connect, so a connection must prove it knows the key (HMAC challenge),
        # which only the engine has (it reads it from the actor's ready() through Ray).
        self.authkey = secrets.token_bytes(32)
        self.path = f"\0tuneguard-{os.getpid()}-{secrets.token_hex(8)}"
        self._listener = Listener(self.path, family="AF_UNIX", authkey=self.authkey)
        threading.Thread(target=self._accept, name="tuneguard-channel", daemon=True).start()

    @property
    def address(self) -> tuple[str, bytes]:
        return self.path, self.authkey

    def _accept(self) -> None:
        while True:
            try:
                conn = self._listener.accept()
            except AuthenticationError:  # not one of our servers
                continue
            except OSError:  # the listener is gone (the process is ending)
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: Connection) -> None:
        buffers, go = None, -1
        try:
            spec = conn.recv()
            with socket.fromfd(conn.fileno(), socket.AF_UNIX, socket.SOCK_STREAM) as s:
                fd, go = recvfds(s, 2)
            try:
                buffers = SharedBuffers(fd, Geometry(**spec["geometry"]))
            finally:
                os.close(fd)
            conn.send(("ok", None, None))
            waiting = select.poll()
            waiting.register(go, select.POLLIN)
            waiting.register(conn.fileno(), select.POLLIN)
            while True:
                ready = {fd for fd, _ in waiting.poll()}
                if conn.fileno() in ready:  # the server closed the channel (EOF) or went away
                    conn.recv()
                    return
                code = os.eventfd_read(go) - 1
                woke = time.monotonic()
                try:
                    with self.lock:
                        began = time.monotonic()
                        value = self.handler(buffers, spec, (code >> 2, (code >> 1) & 1, bool(code & 1)))
                        reply = ("ok", value, (woke, began, time.monotonic()))
                except Exception:
                    reply = ("err", traceback.format_exc(), None)
                conn.send(reply)
        except (EOFError, OSError):
            pass
        finally:
            if buffers is not None:
                buffers.close()
            if go >= 0:
                os.close(go)
            conn.close()


# Server side ------------------------------------------------------------------------------------


class Channel:
    """The server's end: the shared buffers and one connection per actor (in slot order).

    The constructor connects to each actor's listener (``addresses``: (path, authkey)) and hands
    it the shared file, its eventfd and ``specs[i]`` (what that actor needs to find its rows)."""

    def __init__(self, geometry: Geometry, addresses: list[tuple[str, bytes]], specs: list[dict[str, Any]],
                 timeout_s: float):
        self.timeout_s = timeout_s
        self.conns: list[Connection] = []
        # per connection, of its last reply (time.monotonic, one clock for the node's processes):
        # message received, lock taken, work done, reply read here
        self.last_times: list[tuple[float, float, float, float] | None] = [None] * len(addresses)
        self.gos: list[int] = []  # per connection, the eventfd that starts the actor's part
        fd, self.buffers = create_shared(geometry)
        try:
            for (path, key), spec in zip(addresses, specs, strict=True):
                conn = Client(path, family="AF_UNIX", authkey=key)
                self.conns.append(conn)
                self.gos.append(os.eventfd(0, os.EFD_CLOEXEC))
                conn.send({**spec, "geometry": geometry.__dict__})
                with socket.fromfd(conn.fileno(), socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    sendfds(s, [fd, self.gos[-1]])
            for i in range(len(self.conns)):
                self._reply(i, max(timeout_s, 30.0))  # the actor maps the file: no step's timeout
        except BaseException:
            self.close()
            raise
        finally:
            os.close(fd)

    def go(self, i: int, t: int, w: int, prev: bool) -> None:
        """Start actor ``i``'s part of step ``t``: write ``rows[w]``, read the momentum from
        ``rows[1 - w]`` when ``prev``.

        An eventfd, not a socket message: a socket (or pipe) write is a "synchronous" wake-up,
        which Linux tends to answer by running the woken actor on the waker's core, here the
        server's (measured on 2 cores: the Byzantine actor woke 0.46 ms after a socket message,
        0.15 ms after an eventfd write). The step's three numbers travel in the counter's value."""
        try:
            os.eventfd_write(self.gos[i], 1 + ((t << 2) | (w << 1) | int(prev)))
        except (OSError, IndexError) as err:
            raise ChannelBroken(f"channel {i}: {err}") from err

    def recv(self, i: int) -> Any:
        """Actor ``i``'s answer to its last :meth:`go` (within the step timeout)."""
        return self._reply(i, self.timeout_s)

    def _reply(self, i: int, timeout_s: float) -> Any:
        conn = self.conns[i]
        try:
            if not conn.poll(timeout_s):
                raise ChannelBroken(f"no answer within {timeout_s:g} s")
            status, value, times = conn.recv()
        except (EOFError, OSError, ValueError) as err:
            raise ChannelBroken(f"the connection broke ({type(err).__name__}: {err})") from err
        if status == "err":
            raise ChannelError(value)
        self.last_times[i] = (*times, time.monotonic()) if times else None
        return value

    def close(self) -> None:
        for conn in self.conns:
            try:
                conn.close()
            except OSError:
                pass
        self.conns = []
        for fd in getattr(self, "gos", []):
            os.close(fd)
        self.gos = []
        if getattr(self, "buffers", None) is not None:
            self.buffers.close()
            self.buffers = None  # type: ignore[assignment]
