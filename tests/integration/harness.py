"""Real Celery worker processes, a cuttable TCP proxy, and a local HTTP stand-in for an
external service, for the integration tests."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def wait_for(predicate, timeout: float, interval: float = 0.2, message: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


class Worker:
    """``celery worker`` as a subprocess in its own process group."""

    def __init__(self, name: str, log_dir: Path, env: dict, app: str = "config.celery:app",
                 pool: str = "prefork", concurrency: int = 2, extra: tuple = ()) -> None:
        self.name = name
        self.log_path = log_dir / f"worker-{name}.log"
        self._log = open(self.log_path, "wb")
        args = [
            sys.executable, "-m", "celery", "-A", app, "worker",
            "-n", f"{name}@%h", "-P", pool, "-c", str(concurrency), "-l", "INFO",
            "--without-gossip", "--without-mingle", "--without-heartbeat",
            "-I", "tests.integration.worker_tasks", *extra,
        ]
        self.process = subprocess.Popen(
            args, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 60) -> "Worker":
        def ready():
            if self.process.poll() is not None:
                raise AssertionError(f"worker {self.name} exited:\n{self.log()[-4000:]}")
            return " ready." in self.log()
        wait_for(ready, timeout, message=f"worker {self.name} to be ready")
        return self

    def child_pids(self) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    def kill_everything(self) -> None:
        """SIGKILL the main process and its children at once, as the OOM killer would."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
        self.kill_everything()
        self._log.close()


class TcpProxy:
    """Forwards 127.0.0.1:<port> to a target; ``cut()`` drops every connection and
    refuses new ones until ``restore()``, like a database host falling off the network.

    ``hang()`` is the other outage: a black hole. Connections stay open and what is sent
    is read and discarded, never answered; new connections are accepted and never
    answered either. No error ever reaches the client: only its own timeouts end a wait.
    ``restore()`` ends the hang: connections that lost bytes are closed (their protocol
    stream is broken, as after a server restart), the untouched ones forward again.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._listener: socket.socket | None = None
        self._stopped = False
        self._hung = False
        self._lost: set[socket.socket] = set()
        self._unanswered: list[socket.socket] = []
        self.restore()

    def hang(self) -> None:
        self._hung = True

    def restore(self) -> None:
        if self._hung:
            with self._lock:
                self._hung = False
                broken = [pair for pair in self._pairs if pair[0] in self._lost]
                self._pairs = [pair for pair in self._pairs if pair[0] not in self._lost]
                broken_sockets = [sock for pair in broken for sock in pair] + self._unanswered
                self._lost, self._unanswered = set(), []
            for sock in broken_sockets:
                self._close(sock)
        if self._listener is not None:
            return
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            if self._hung:
                with self._lock:
                    self._unanswered.append(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._pairs.append((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        sockets = [a, b]
        try:
            while True:
                readable, _, _ = select.select(sockets, [], [], 1.0)
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        return
                    if self._hung:
                        with self._lock:
                            self._lost.add(a)
                        continue
                    (b if sock is a else a).sendall(data)
        except OSError:
            return
        finally:
            for sock in sockets:
                try:
                    sock.close()
                except OSError:
                    pass

    def cut(self) -> None:
        if self._listener is not None:
            try:
                # Wakes the thread blocked in accept(); close() alone would leave it listening.
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._listener.close()
            self._listener = None
        with self._lock:
            pairs, self._pairs = self._pairs, []
            unanswered, self._unanswered = self._unanswered, []
            self._hung, self._lost = False, set()
        for sock in [sock for pair in pairs for sock in pair] + unanswered:
            self._close(sock)

    @staticmethod
    def _close(sock: socket.socket) -> None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()

    def close(self) -> None:
        self.cut()


class StandIn:
    """A local HTTP stand-in for an external API whose failure mode the test sets.

    ``GET /<service>/<anything>`` answers as ``modes[service]`` says: ``"healthy"`` (200 with
    a JSON quote) or an HTTP status such as ``"503"``. Every request is counted per service,
    with the ``X-Worker`` header the caller sent, before it is answered.
    """

    def __init__(self, **modes: str) -> None:
        self.modes: dict[str, str] = {"quote": "healthy", "backup": "healthy", **modes}
        self._lock = threading.Lock()
        self._requests: list[tuple[str, str, str]] = []
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                service = self.path.strip("/").split("/", 1)[0]
                with stand_in._lock:
                    stand_in._requests.append((service, self.path,
                                               self.headers.get("X-Worker", "")))
                    mode = stand_in.modes.get(service, "404")
                if mode == "healthy":
                    body = json.dumps({"path": self.path, "price": 101.5,
                                       "source": service}).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                else:
                    body = f"{service} is {mode}".encode()
                    self.send_response(int(mode))
                    self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format, *args) -> None:  # noqa: A002
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def set(self, service: str, mode: str) -> None:
        with self._lock:
            self.modes[service] = mode

    def count(self, service: str = "quote") -> int:
        with self._lock:
            return sum(1 for s, _, _ in self._requests if s == service)

    def callers(self, service: str = "quote") -> set[str]:
        with self._lock:
            return {worker for s, _, worker in self._requests if s == service}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class WebhookReceiver:
    """A webhook endpoint on localhost that records every POST and answers with the
    statuses queued in ``statuses`` (``(status, headers)`` or ``(status, headers, delay)``),
    then 200."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: list[dict] = []
        self.statuses: list[tuple] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with receiver._lock:
                    receiver.requests.append({"headers": dict(self.headers), "body": body,
                                              "path": self.path, "at": time.time()})
                    answer = receiver.statuses.pop(0) if receiver.statuses else (200, {})
                status, headers, delay = (tuple(answer) + (0.0,))[:3]
                if delay:
                    time.sleep(delay)
                try:
                    self.send_response(status)
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"ok")
                except OSError:
                    pass  # the caller gave up waiting

            def log_message(self, format, *args) -> None:  # noqa: A002
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}/tickets"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def received(self) -> list[dict]:
        with self._lock:
            return list(self.requests)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Beat:
    """``celery beat`` as a subprocess in its own process group, its schedule file (and
    log) in ``work_dir``."""

    def __init__(self, work_dir: Path, env: dict, app: str = "config.celery:app") -> None:
        self.log_path = work_dir / "beat.log"
        self._log = open(self.log_path, "wb")
        args = [sys.executable, "-m", "celery", "-A", app, "beat", "-l", "INFO",
                "-s", str(work_dir / "celerybeat-schedule"), "--max-interval", "1"]
        self.process = subprocess.Popen(
            args, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 30) -> "Beat":
        def ready():
            if self.process.poll() is not None:
                raise AssertionError(f"beat exited:\n{self.log()[-4000:]}")
            return "beat: Starting..." in self.log()
        wait_for(ready, timeout, message="celery beat to start")
        return self

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=30)
        self._log.close()
