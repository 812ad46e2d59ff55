"""A loopback HTTP proxy that can drop the connection after the node has answered: the client then sees
a transport error for a call the node did apply — the case identical re-sends exist for."""

from __future__ import annotations

import http.client
import socket
import threading


class DroppingProxy:
    def __init__(self, upstream: str) -> None:
        host, port = upstream.removeprefix("http://").split(":")
        self._upstream = (host, int(port))
        self._server = socket.create_server(("127.0.0.1", 0))
        self.base_url = f"http://127.0.0.1:{self._server.getsockname()[1]}"
        # How many step calls to forward and then answer by closing the connection.
        self.drop_steps = 0
        self.step_bodies: list[bytes] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._server.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as reader:
            while True:
                request_line = reader.readline()
                if not request_line.strip():
                    return
                method, path, _ = request_line.decode().split(" ", 2)
                headers: dict[str, str] = {}
                while (line := reader.readline().decode()) not in ("\r\n", "\n", ""):
                    name, value = line.split(":", 1)
                    headers[name.strip().lower()] = value.strip()
                body = reader.read(int(headers.get("content-length", "0")))
                upstream = http.client.HTTPConnection(*self._upstream, timeout=30)
                forwarded = {k: v for k, v in headers.items() if k not in ("host", "connection")}
                upstream.request(method, path, body=body or None, headers=forwarded)
                response = upstream.getresponse()
                data = response.read()
                upstream.close()
                if path.endswith("/steps"):
                    self.step_bodies.append(body)
                    if self.drop_steps > 0:
                        self.drop_steps -= 1
                        return
                head = f"HTTP/1.1 {response.status} {response.reason}\r\n"
                head += f"content-type: {response.getheader('content-type', 'application/json')}\r\n"
                head += f"content-length: {len(data)}\r\n\r\n"
                conn.sendall(head.encode() + data)
