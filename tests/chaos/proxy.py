"""A TCP proxy in front of a Redis server that plays a server stalled under a client's
write: what the connections open at :meth:`HoldingProxy.hold` send from then on waits
in the proxy, and their server side stays open after the client gave up on them; at
:meth:`HoldingProxy.release` it reaches the server, late, on those same connections,
as a server that stalled (a fork, an fsync, a paused VM) reads its buffers once it
runs again. Connections made after :meth:`hold` pass freely. :meth:`HoldingProxy.reset`
resets the connections open, as a server killed under load does."""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field

CHUNK = 65_536


@dataclass
class _Pair:
    client: socket.socket
    upstream: socket.socket
    held: bytearray | None = None  # None: passing; else what the client sent since hold()
    client_gone: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)
    done: threading.Event = field(default_factory=threading.Event)  # the server closed it


class HoldingProxy:
    def __init__(self, server_port: int) -> None:
        self._server = ("127.0.0.1", server_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._pairs: list[_Pair] = []
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True, name="proxy-accept").start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def hold(self) -> None:
        """From now on, keep what the open connections send."""
        with self._lock:
            for pair in self._pairs:
                with pair.lock:
                    pair.held = bytearray()

    def held_bytes(self) -> int:
        with self._lock:
            return sum(len(p.held or b"") for p in self._pairs)

    def release(self) -> int:
        """Send the server what was held, on the connections it was sent on; those whose
        client has gone are then closed once the server has answered all of it (it runs
        every command it read before it sees the end). The bytes released."""
        released = 0
        with self._lock:
            pairs = list(self._pairs)
        for pair in pairs:
            with pair.lock:
                held, pair.held = pair.held, None
                gone = pair.client_gone
            if held is None:
                continue
            if held:
                pair.upstream.sendall(held)
                released += len(held)
            if gone:
                with suppress(OSError):  # unless the server has closed it already
                    pair.upstream.shutdown(socket.SHUT_WR)
        return released

    def wait_released(self, timeout: float) -> bool:
        """The server has closed every connection whose client had gone: it ran all
        that was released on them."""
        with self._lock:
            pairs = [p for p in self._pairs if p.client_gone]
        return all(p.done.wait(timeout) for p in pairs)

    def reset(self) -> None:
        """Close every connection open now with a TCP reset on the client's side (as a
        server killed with bytes unread sends one): its next read or write fails with
        ConnectionResetError."""
        with self._lock:
            pairs = list(self._pairs)
        for pair in pairs:
            with suppress(OSError):  # closed already
                pair.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                pair.client.shutdown(socket.SHUT_RD)  # _up's read returns
                pair.client.close()  # with SO_LINGER 0: a reset

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        with self._lock:
            for pair in self._pairs:
                pair.upstream.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self._server)
            pair = _Pair(client, upstream)
            with self._lock:
                self._pairs.append(pair)
            threading.Thread(target=self._up, args=(client, pair), daemon=True).start()
            threading.Thread(target=self._down, args=(client, pair), daemon=True).start()

    def _up(self, client: socket.socket, pair: _Pair) -> None:
        """Client to server: passed on, or held."""
        while True:
            try:
                data = client.recv(CHUNK)
            except OSError:
                data = b""
            with pair.lock:
                if not data:
                    pair.client_gone = True
                    if pair.held is None:
                        with suppress(OSError):
                            pair.upstream.shutdown(socket.SHUT_WR)
                    return
                if pair.held is not None:
                    pair.held += data
                    continue
            try:
                pair.upstream.sendall(data)
            except OSError:
                return

    def _down(self, client: socket.socket, pair: _Pair) -> None:
        """Server to client, until the server closes; once the client has gone, the
        replies (to what was released) are read and dropped."""
        open_ = True
        while True:
            try:
                data = pair.upstream.recv(CHUNK)
            except OSError:
                break
            if not data:
                break
            if open_:
                try:
                    client.sendall(data)
                except OSError:
                    open_ = False
        client.close()
        pair.done.set()


@contextmanager
def holding_proxy(server_port: int) -> Iterator[HoldingProxy]:
    proxy = HoldingProxy(server_port)
    try:
        yield proxy
    finally:
        proxy.close()
