"""A TCP proxy on loopback that cuts the first artifact download mid-body, the way a dropped
network connection does, and relays everything else untouched."""

import socket
import threading


class FlakyProxy:
    def __init__(self, upstream_port: int, cut_after_bytes: int = 2000):
        self.upstream_port, self.cut_after = upstream_port, cut_after_bytes
        self.cuts = 0
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.stopped = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.stopped.set()
        self.listener.close()

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            state = {"download": False, "relayed": 0}
            threading.Thread(target=self._pipe, args=(client, upstream, state, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, state, False), daemon=True).start()

    def _pipe(self, source, sink, state, from_client: bool) -> None:
        try:
            while data := source.recv(65536):
                if from_client and b"/artifacts/" in data:
                    state["download"] = True
                if not from_client and state["download"] and self.cuts == 0:
                    state["relayed"] += len(data)
                    if state["relayed"] > self.cut_after:
                        self.cuts += 1
                        sink.sendall(data[: self.cut_after // 2])
                        raise ConnectionResetError("cut by the flaky proxy")
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
