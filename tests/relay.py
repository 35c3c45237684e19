"""A TCP relay on loopback between the code under test and a real server, for the network faults
the tests need: a download cut mid-body, an answer lost after the server acted, an upload cut
mid-way, the server taken away and given back.

`meddle(chunk, from_client, connection)` sees every chunk and returns the bytes to pass on;
`connection` is a dict a meddler may keep its per-connection state in. Raising `Cut(prefix)`
passes `prefix` on and drops that connection, as a broken network does. `down()` drops every open
connection and refuses new ones until `up()`.
"""

import socket
import threading
from collections.abc import Callable


class Cut(Exception):
    def __init__(self, prefix: bytes = b""):
        super().__init__("cut by the test relay")
        self.prefix = prefix


Meddler = Callable[[bytes, bool, dict], bytes]


class Relay:
    def __init__(self, upstream_port: int, meddle: Meddler | None = None):
        self.upstream_port, self.meddle = upstream_port, meddle
        self.lock = threading.Lock()  # meddlers count under it too: two pipes run at once
        self.is_up = True
        self.open: list[socket.socket] = []
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def down(self) -> None:
        with self.lock:
            self.is_up = False
            for s in self.open:
                _close(s)
            self.open.clear()

    def up(self) -> None:
        with self.lock:
            self.is_up = True

    def close(self) -> None:
        self.down()
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                if not self.is_up:
                    _close(client)
                    continue
                try:
                    upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
                except OSError:
                    _close(client)
                    continue
                self.open += [client, upstream]
            connection: dict = {}
            threading.Thread(target=self._pipe, args=(client, upstream, True, connection), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False, connection), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, from_client: bool, connection: dict) -> None:
        try:
            while data := source.recv(65536):
                if self.meddle is not None:
                    try:
                        with self.lock:
                            data = self.meddle(data, from_client, connection)
                    except Cut as cut:
                        sink.sendall(cut.prefix)
                        return
                sink.sendall(data)
        except OSError:
            pass
        finally:
            _close(source)
            _close(sink)


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    s.close()
