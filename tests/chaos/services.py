"""The chaos suite's own PostgreSQL, Redis and hanging TCP proxy.

The suite restarts and hangs its database and restarts its broker, so it never uses the
machine's shared PostgreSQL and Redis: it starts private ones on free ports in a temporary
directory and tears them down on every exit path (see ``tests/chaos/conftest.py``).
"""

from __future__ import annotations

import glob
import os
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from tests.integration.harness import wait_for


def free_port() -> int:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    return port


def _answers(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex(("127.0.0.1", port)) == 0


class Postgres:
    """A throw-away PostgreSQL cluster (initdb, trust auth, fsync on) run as the
    ``postgres`` OS user, because PostgreSQL refuses to run as root."""

    def __init__(self, root: Path) -> None:
        candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
                            key=lambda p: int(p.split("/")[4]))
        if not candidates:
            raise RuntimeError("no PostgreSQL server binaries under /usr/lib/postgresql/*/bin")
        self.bin = Path(candidates[-1]).parent
        self.root = root / "pg"
        self.root.mkdir(parents=True)
        self.data = self.root / "data"
        self.log_path = self.root / "postgres.log"
        self.port = free_port()
        shutil.chown(self.root, "postgres", "postgres")
        self._as_postgres([str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust",
                           "-U", "postgres", "-E", "UTF8", "--no-sync"], timeout=120)

    def _as_postgres(self, args: list[str], timeout: float) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", *args], check=True, timeout=timeout,
                       capture_output=True, start_new_session=True)

    def _pg_ctl(self, *args: str, timeout: float = 120) -> None:
        self._as_postgres([str(self.bin / "pg_ctl"), "-D", str(self.data), "-l",
                           str(self.log_path), "-w", "-t", str(int(timeout)), *args],
                          timeout=timeout + 10)

    @property
    def _options(self) -> str:
        return (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=on "
                f"-c max_connections=200")

    def start(self) -> "Postgres":
        self._pg_ctl("-o", self._options, "start")
        wait_for(lambda: _answers(self.port), 30, message="PostgreSQL to listen")
        return self

    def restart(self) -> None:
        """A fast restart, as an operator or a package upgrade does it: sessions are cut."""
        self._pg_ctl("-m", "fast", "-o", self._options, "restart")

    def postmaster_pid(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def url(self, port: int | None = None, database: str = "chaos") -> str:
        return f"postgres://postgres@127.0.0.1:{port or self.port}/{database}"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        try:
            self._pg_ctl("-m", "immediate", "stop", timeout=30)
        except (subprocess.SubprocessError, OSError):
            pass
        pid = self.postmaster_pid()
        if pid is None:
            return
        children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
        for victim in [pid, *(int(p) for p in children.stdout.split())]:
            try:
                os.kill(victim, signal.SIGKILL)
            except ProcessLookupError:
                pass


class RedisServer:
    """A private redis-server with append-only persistence, as production runs it."""

    def __init__(self, root: Path) -> None:
        self.dir = root / "redis"
        self.dir.mkdir(parents=True)
        self.port = free_port()
        self.log_path = self.dir / "redis.log"
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--dir", str(self.dir), "--appendonly", "yes", "--appendfsync", "everysec",
             "--save", "", "--daemonize", "no", "--logfile", str(self.log_path)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        wait_for(self._pong, 30, message="redis-server to answer")
        return self

    def _pong(self) -> bool:
        out = subprocess.run(["redis-cli", "-p", str(self.port), "ping"], capture_output=True,
                             text=True)
        return out.stdout.strip() == "PONG"

    def run_id(self) -> str:
        out = subprocess.run(["redis-cli", "-p", str(self.port), "info", "server"],
                             capture_output=True, text=True)
        return next((line.split(":", 1)[1].strip() for line in out.stdout.splitlines()
                     if line.startswith("run_id:")), "")

    def restart(self) -> None:
        """SHUTDOWN (the append-only file is flushed), then start on the same files."""
        subprocess.run(["redis-cli", "-p", str(self.port), "shutdown"], capture_output=True,
                       timeout=30)
        if self.process is not None:
            self.process.wait(timeout=30)
        self.start()

    def stop(self) -> None:
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=30)


class HangingProxy:
    """Forwards 127.0.0.1:<port> to a target; ``hang()`` makes it a black hole.

    While hanging it still accepts connections and keeps every connection open, but
    forwards nothing: what clients send is read and discarded and nothing comes back,
    as a database stalled on a dead disk or a half-open network path behaves. Clients
    see no error, only silence, until their own timeouts fire. ``restore()`` closes the
    connections that went through the hang (their protocol state is lost, as after a
    partition heals with resets) and forwards new ones again.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._hanging = threading.Event()
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self._poisoned: list[socket.socket] = []
        self._open: set[socket.socket] = set()
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def hang(self) -> None:
        self._hanging.set()

    def restore(self) -> None:
        with self._lock:
            self._hanging.clear()
            doomed, self._poisoned = self._poisoned, []
        for sock in doomed:
            self._close(sock)

    def close(self) -> None:
        self._stopped.set()
        self._hanging.clear()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        with self._lock:
            sockets = list(self._open) + self._poisoned
        for sock in sockets:
            self._close(sock)

    @staticmethod
    def _close(sock: socket.socket) -> None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            sock.close()
        except OSError:
            pass

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        upstream = None
        if not self._hanging.is_set():
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                self._close(client)
                return
        with self._lock:
            self._open.add(client)
            if upstream is not None:
                self._open.add(upstream)
        try:
            self._pump(client, upstream)
        finally:
            with self._lock:
                self._open.discard(client)
                self._open.discard(upstream)
            self._close(client)
            if upstream is not None:
                self._close(upstream)

    def _pump(self, client: socket.socket, upstream: socket.socket | None) -> None:
        sockets = [s for s in (client, upstream) if s is not None]
        poisoned = False
        while not self._stopped.is_set():
            if not poisoned and (upstream is None or self._hanging.is_set()):
                with self._lock:
                    if not self._hanging.is_set() and upstream is None:
                        return  # accepted during a hang that is over: reset, as restore() does
                    if self._hanging.is_set():
                        poisoned = True
                        self._poisoned.extend(sockets)
            try:
                readable, _, _ = select.select(sockets, [], [], 0.2)
            except (OSError, ValueError):
                return
            for sock in readable:
                try:
                    data = sock.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                if poisoned:
                    continue  # the black hole: read, never forward
                other = upstream if sock is client else client
                try:
                    other.sendall(data)
                except OSError:
                    return


class RabbitMQNode:
    """A private RabbitMQ node (its own name, ports and data directory; no plugins), so
    that restarting it disturbs no other test and no shared broker."""

    def __init__(self) -> None:
        # Under /tmp itself: the server script runs as the rabbitmq user when started as
        # root, and pytest's own temporary directories are private to root.
        self.dir = Path(tempfile.mkdtemp(prefix="cr-rabbitmq-"))
        (self.dir / "mnesia").mkdir()
        (self.dir / "log").mkdir()
        (self.dir / "enabled_plugins").write_text("[].\n")
        (self.dir / "rabbitmq.conf").write_text("")
        subprocess.run(["chmod", "-R", "a+rwX", str(self.dir)], check=True)
        self.port = free_port()
        self.name = f"crtest{self.port}@localhost"
        self.env = {
            **os.environ,
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(free_port()),
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.dir / "advanced.config"),
            "RABBITMQ_PID_FILE": str(self.dir / "pid"),
        }

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def _ctl(self, *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
        return subprocess.run(["rabbitmqctl", "-n", self.name, *args], env=self.env,
                              capture_output=True, text=True, timeout=timeout)

    def start(self) -> "RabbitMQNode":
        subprocess.run(["rabbitmq-server", "-detached"], env=self.env, check=True,
                       capture_output=True, timeout=60)
        deadline = time.monotonic() + 90
        while self._ctl("await_startup", "--timeout", "5", timeout=30).returncode != 0:
            if time.monotonic() > deadline:
                raise AssertionError(f"RabbitMQ node {self.name} did not start")
            time.sleep(1)
        return self

    def restart(self) -> None:
        """Stop the node (its queues are durable, on disk), then start it on the same data."""
        self._ctl("stop")
        self.start()

    def stop(self) -> None:
        self._ctl("stop")
        shutil.rmtree(self.dir, ignore_errors=True)
