"""A private PostgreSQL server for tests: ``initdb`` + ``pg_ctl`` on a free loopback port, torn down after.

The server binaries are found on ``PATH`` or under ``/usr/lib/postgresql/<version>/bin`` (Debian's layout;
``.ci/run`` installs the ``postgresql`` package when they are missing). PostgreSQL refuses to run as root, so
when the tests run as root the cluster is created and run as ``nobody`` (any unprivileged account works:
``NOISEWISE_TEST_PG_USER`` names another): the temporary directory is chowned to that user, and every
server command runs with ``subprocess``'s ``user=``/``group=``/``extra_groups=[]``. Authentication is
``trust`` on 127.0.0.1 and on a unix socket inside the temporary directory, so nothing else on the machine
(another helper's server, a system cluster on 5432) is touched.

Use :func:`postgres_session` (a context manager) or the pytest fixture :func:`postgres_server`
(session-scoped: one server per test run), and :meth:`PostgresServer.create_database` for a fresh database
per test.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

SUPERUSER = "noisewise"
DATABASE = "noisewise"
# A non-UTC server time zone: timestamps read back must be converted to UTC by the code under test, not
# happen to be UTC because the server's zone is.
TIME_ZONE = "America/Sao_Paulo"
START_TIMEOUT_S = 60


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server binaries on this machine (the only reason to skip rather than fail)."""


class PostgresStartError(RuntimeError):
    """initdb or the server failed; the message carries the command's output or the server log tail."""


def find_bin_dir() -> Path:
    """The directory holding ``initdb``, ``pg_ctl`` and ``postgres``: ``PATH`` first, then the newest
    ``/usr/lib/postgresql/*/bin``."""
    candidates = []
    on_path = shutil.which("initdb")
    if on_path:
        # Debian links only some tools into PATH (pg_ctlcluster wrappers); the real directory has them all
        candidates.append(Path(on_path).resolve().parent)
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin"),
                      key=lambda p: [int(x) for x in re.findall(r"\d+", p.parent.name)] or [0], reverse=True)
    candidates.extend(versions)
    for directory in candidates:
        if all((directory / tool).is_file() and os.access(directory / tool, os.X_OK)
               for tool in ("initdb", "pg_ctl", "postgres")):
            return directory
    raise PostgresUnavailable(
        "no PostgreSQL server binaries (initdb, pg_ctl, postgres) on PATH or in /usr/lib/postgresql/*/bin: "
        "install the Debian package `postgresql` (.ci/run does this when they are missing)")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PostgresServer:
    """One throw-away cluster in a temporary directory.

    Parameters
    ----------
    bin_dir : Path, optional
        Where the server binaries are; default :func:`find_bin_dir`.
    run_as : str, optional
        OS account that owns and runs the cluster when the caller is root; default ``nobody`` (or
        ``NOISEWISE_TEST_PG_USER``). Ignored when not root (the cluster runs as the caller).
    """

    def __init__(self, bin_dir: Path | None = None, run_as: str | None = None):
        self.bin_dir = bin_dir or find_bin_dir()
        self._account = None
        if os.geteuid() == 0:
            self._account = pwd.getpwnam(run_as or os.environ.get("NOISEWISE_TEST_PG_USER", "nobody"))
        self.root = Path(tempfile.mkdtemp(prefix="noisewise-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        self.port: int | None = None
        self._running = False
        if self._account is not None:
            # mkdtemp makes a 0700 root directory: hand it to the server's user (/tmp itself is world-traversable)
            os.chown(self.root, self._account.pw_uid, self._account.pw_gid)

    # --- commands ------------------------------------------------------------------------------------------
    def _run(self, *args: str, timeout: float = START_TIMEOUT_S) -> subprocess.CompletedProcess:
        env = {"PATH": f"{self.bin_dir}:/usr/bin:/bin", "LC_ALL": "C", "LANG": "C", "TZ": "UTC",
               "HOME": str(self.root)}
        kwargs = {}
        if self._account is not None:
            kwargs = {"user": self._account.pw_uid, "group": self._account.pw_gid, "extra_groups": []}
        # cwd: the server's user cannot read root's working directory, and pg_ctl complains about that
        return subprocess.run([str(self.bin_dir / args[0]), *args[1:]], cwd=self.root, env=env, capture_output=True,
                              text=True, timeout=timeout, check=False, **kwargs)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError as err:
            return f"(no server log: {err})"

    def start(self, attempts: int = 3) -> PostgresServer:
        """``initdb`` (trust auth, UTF8, C locale) and ``pg_ctl start -w`` on a free port; raises
        :class:`PostgresStartError` with the output or the log tail on failure."""
        init = self._run("initdb", "-D", str(self.data), "-U", SUPERUSER, "--auth=trust", "--encoding=UTF8",
                         "--locale=C", "--no-sync")
        if init.returncode != 0:
            raise PostgresStartError(f"initdb failed ({init.returncode}): {(init.stdout + init.stderr).strip()[-2000:]}")
        for attempt in range(attempts):
            # another process can take the free port between the probe and the bind: try a new one
            self.port = free_port()
            options = (f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} -c TimeZone={TIME_ZONE} "
                       "-c max_connections=60 -c shared_buffers=16MB -c fsync=on")
            started = self._run("pg_ctl", "start", "-D", str(self.data), "-l", str(self.log), "-w",
                                "-t", str(START_TIMEOUT_S), "-o", options, timeout=START_TIMEOUT_S + 10)
            if started.returncode == 0:
                self._running = True
                break
            if "could not bind" not in self.log_tail() or attempt == attempts - 1:
                raise PostgresStartError(
                    f"pg_ctl start failed ({started.returncode}): {(started.stdout + started.stderr).strip()[-1000:]}"
                    f"\n--- {self.log} (tail) ---\n{self.log_tail()}")
        self.create_database(DATABASE)
        return self

    def stop(self) -> None:
        """``pg_ctl stop -m fast`` and remove the directory (idempotent)."""
        if self._running:
            self._run("pg_ctl", "stop", "-D", str(self.data), "-m", "fast", "-w", "-t", "30")
            self._running = False
        shutil.rmtree(self.root, ignore_errors=True)

    # --- databases -----------------------------------------------------------------------------------------
    def url(self, database: str = DATABASE, driver: str = "psycopg") -> str:
        """SQLAlchemy URL of ``database`` over TCP on 127.0.0.1."""
        return f"postgresql+{driver}://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str | None = None) -> str:
        """Create an empty database (``name`` or a fresh unique one); returns its name."""
        import psycopg

        name = name or f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(host="127.0.0.1", port=self.port, user=SUPERUSER, dbname="postgres",
                             autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return name

    def drop_database(self, name: str) -> None:
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user=SUPERUSER, dbname="postgres",
                             autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def __enter__(self) -> PostgresServer:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


@contextlib.contextmanager
def postgres_session() -> Iterator[PostgresServer]:
    """A started :class:`PostgresServer`, stopped and removed on exit."""
    with PostgresServer() as server:
        yield server


@pytest.fixture(scope="session", name="postgres_server")
def postgres_server_fixture() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the test session. Skips only when no server binaries exist at all (with the
    reason); any failure to start fails the tests that use it, with the server log tail."""
    try:
        bin_dir = find_bin_dir()
    except PostgresUnavailable as err:
        pytest.skip(str(err))
    server = None
    try:
        server = PostgresServer(bin_dir)
        server.start()
    except Exception as err:
        if server is not None:
            server.stop()
        pytest.fail(f"could not start a private PostgreSQL server: {type(err).__name__}: {err}", pytrace=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["sqlite", "postgresql"], name="url")
def store_url_fixture(request, tmp_path) -> str:
    """The URL of an empty store database: a new SQLite file, or a new database on the session's PostgreSQL
    (dropped afterwards). Import it next to :func:`postgres_server_fixture` to run a test on both backends."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    server = request.getfixturevalue("postgres_server")
    name = server.create_database()
    request.addfinalizer(lambda: server.drop_database(name))
    return server.url(name)
