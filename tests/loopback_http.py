"""A threaded HTTP server on a free loopback port, for the small servers the tests run."""

from __future__ import annotations

import threading
from http.server import ThreadingHTTPServer
from typing import Optional


class LoopbackServer:
    """Subclasses build a handler class in start() and hand it to _serve()."""

    _server: Optional[ThreadingHTTPServer] = None

    def _serve(self, handler) -> None:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()

    def start(self):
        raise NotImplementedError

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
