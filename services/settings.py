"""Serving configuration from ``NOISEWISE_*`` environment variables, and where noisewise keeps its state.

Everything the service itself needs is a field of :class:`Settings`, validated up front so that a bad value
stops the server with one line naming the variable. Each field carries its variable and a description; the
reference, docs/settings.md, is generated from them and from the variables read elsewhere
(:data:`AUTH_VARIABLES`, :data:`OTHER_VARIABLES`)::

    python -m noisewise.services.settings --markdown > docs/settings.md

With keys configured, /feedback, /suspects, /reload and every route not listed as open in
``services/auth.py`` need ``Authorization: Bearer KEY``; without keys the service logs a warning.

:func:`ensure_home` resolves and creates ``NOISEWISE_HOME``; when it has to create the directory it says so
on stderr, since a fresh home has no models and no store (the usual cause: a command run from another
directory than the one holding ``./.noisewise``).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TextIO

from noisewise.services.auth import (
    KEYS_ENV,
    KEYS_FILE_ENV,
    METRICS_ENV,
    PREDICT_ENV,
    AuthConfig,
    auth_from_env,
)

DEFAULT_MODEL = "noisewise-demo@champion"
SERVER_TIMEOUT_S = 60  # BentoML's traffic timeout (services/service.py): it answers 504 past this
HOME_ENV = "NOISEWISE_HOME"
DEFAULT_HOME = ".noisewise"
REGENERATE = "python -m noisewise.services.settings --markdown > docs/settings.md"
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?|mps)$")
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def _setting(default: Any, env: str, description: str, shown: str | None = None) -> Any:
    """A :class:`Settings` field read from ``env``; ``shown`` is the default as the reference prints it
    (the value itself when None)."""
    return field(default=default, metadata={"env": env, "description": description, "shown": shown})


class SettingsError(ValueError):
    """An environment variable with a value the service cannot use."""


@dataclass(frozen=True)
class Settings:
    model: str = _setting(DEFAULT_MODEL, "NOISEWISE_MODEL",
                          "registered model to serve: `NAME@ALIAS`, `NAME/VERSION` or a bare `NAME` (alias `champion`)")
    device: str = _setting("auto", "NOISEWISE_DEVICE", "`auto` (cuda when available), `cpu`, `cuda`, `cuda:N` or `mps`")
    max_batch: int = _setting(256, "NOISEWISE_MAX_BATCH", "most inputs (arrays or images) in one request")
    top_k: int = _setting(3, "NOISEWISE_TOP_K", "classes listed in each prediction's `top_k`")
    batching: bool = _setting(True, "NOISEWISE_BATCHING", "adaptive batching across requests (`0` turns it off)")
    batch_max_size: int = _setting(256, "NOISEWISE_BATCH_MAX_SIZE",
                                   "most inputs in one forward pass (at least 2)")
    batch_max_latency_ms: int = _setting(10_000, "NOISEWISE_BATCH_MAX_LATENCY_MS",
                                         "a request queued longer than this (milliseconds) is shed with 503")
    max_image_pixels: int = _setting(4096 * 4096, "NOISEWISE_MAX_IMAGE_PIXELS",
                                     "largest decoded image, width x height (4096 x 4096)")
    max_image_bytes: int = _setting(4096 * 4096 * 4, "NOISEWISE_MAX_IMAGE_BYTES",
                                    "largest decoded image in bytes, width x height x channels x bytes per channel "
                                    "(64 MiB: 4096 x 4096 RGBA at 8 bits; 413 beyond)")
    max_body_bytes: int = _setting(32 * 1024 * 1024, "NOISEWISE_MAX_BODY_BYTES",
                                   "largest request body in bytes (32 MiB; 413 beyond)")
    max_feedback_items: int = _setting(1000, "NOISEWISE_MAX_FEEDBACK_ITEMS",
                                       "most items in one `/feedback` request (413 beyond)")
    store: bool = _setting(True, "NOISEWISE_STORE", "store predictions and accept feedback (`0`: neither)")
    feedback_lane: bool = _setting(True, "NOISEWISE_FEEDBACK_LANE",
                                   "serve `POST /feedback` in front of BentoML's middleware: the same answers and "
                                   "request metrics at a fraction of the CPU, without BentoML's access-log line "
                                   "and trace span for it (`0`: through BentoML's stack)")
    reload_interval_s: float = _setting(5.0, "NOISEWISE_RELOAD_INTERVAL_S",
                                        "seconds between checks of the alias for a new version (hot reload; "
                                        "`0`: never, only `POST /reload`)")
    monitor_interval_s: float = _setting(10.0, "NOISEWISE_MONITOR_INTERVAL_S",
                                         "seconds between recomputations of the feedback gauges")
    monitor_window: int = _setting(5000, "NOISEWISE_MONITOR_WINDOW",
                                   "most recent feedback items behind those gauges")
    request_timeout_s: float = _setting(30.0, "NOISEWISE_REQUEST_TIMEOUT_S",
                                        f"longest wait in seconds for a prediction: decoding its images and its forward pass (408 beyond; "
                                        f"`0`: no limit but the server's {SERVER_TIMEOUT_S} s; below "
                                        f"{SERVER_TIMEOUT_S}). `/feedback` is never cut off mid-commit")
    # read by services/auth.py from the variables in AUTH_VARIABLES
    auth: AuthConfig = field(default_factory=AuthConfig, repr=False)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        defaults = cls()

        def positive_int(name: str, default: int) -> int:
            text = env.get(name, "").strip()
            if not text:
                return default
            try:
                value = int(text)
            except ValueError:
                raise SettingsError(f"{name}: expected a positive integer, got {text!r}") from None
            if value < 1:
                raise SettingsError(f"{name}: expected a positive integer, got {value}")
            return value

        def seconds(name: str, default: float) -> float:
            text = env.get(name, "").strip()
            if not text:
                return default
            try:
                value = float(text)
            except ValueError:
                raise SettingsError(f"{name}: expected a number of seconds, got {text!r}") from None
            if not 0 <= value < 86400 * 365:
                raise SettingsError(f"{name}: expected a number of seconds >= 0, got {text}")
            return value

        def flag(name: str, default: bool) -> bool:
            text = env.get(name, "").strip().lower()
            if not text:
                return default
            if text not in _TRUE | _FALSE:
                raise SettingsError(f"{name}: expected 1/0 (or true/false, yes/no, on/off), got {text!r}")
            return text in _TRUE

        def request_timeout() -> float:
            value = seconds("NOISEWISE_REQUEST_TIMEOUT_S", defaults.request_timeout_s)
            if value >= SERVER_TIMEOUT_S:  # BentoML would answer 504 first, and the 408 would never be sent
                raise SettingsError(f"NOISEWISE_REQUEST_TIMEOUT_S: expected less than the server's timeout of "
                                    f"{SERVER_TIMEOUT_S} s, got {value:g}")
            return value

        model = env.get("NOISEWISE_MODEL", "").strip() or defaults.model
        if any(c.isspace() for c in model) or model.startswith("@") or model.endswith(("@", "/")):
            raise SettingsError(f"NOISEWISE_MODEL: expected NAME@ALIAS or NAME/VERSION, got {model!r}")
        device = env.get("NOISEWISE_DEVICE", "").strip().lower() or defaults.device
        if not _DEVICE.match(device):
            raise SettingsError(f"NOISEWISE_DEVICE: expected auto, cpu, cuda or cuda:N, got {device!r}")
        return cls(
            model=model,
            device=device,
            max_batch=positive_int("NOISEWISE_MAX_BATCH", defaults.max_batch),
            top_k=positive_int("NOISEWISE_TOP_K", defaults.top_k),
            batching=flag("NOISEWISE_BATCHING", defaults.batching),
            # BentoML's dispatcher needs room for at least two inputs per batch
            batch_max_size=max(2, positive_int("NOISEWISE_BATCH_MAX_SIZE", defaults.batch_max_size)),
            batch_max_latency_ms=positive_int("NOISEWISE_BATCH_MAX_LATENCY_MS", defaults.batch_max_latency_ms),
            max_image_pixels=positive_int("NOISEWISE_MAX_IMAGE_PIXELS", defaults.max_image_pixels),
            max_image_bytes=positive_int("NOISEWISE_MAX_IMAGE_BYTES", defaults.max_image_bytes),
            max_body_bytes=positive_int("NOISEWISE_MAX_BODY_BYTES", defaults.max_body_bytes),
            max_feedback_items=positive_int("NOISEWISE_MAX_FEEDBACK_ITEMS", defaults.max_feedback_items),
            store=flag("NOISEWISE_STORE", defaults.store),
            feedback_lane=flag("NOISEWISE_FEEDBACK_LANE", defaults.feedback_lane),
            reload_interval_s=seconds("NOISEWISE_RELOAD_INTERVAL_S", defaults.reload_interval_s),
            monitor_interval_s=seconds("NOISEWISE_MONITOR_INTERVAL_S", defaults.monitor_interval_s),
            monitor_window=positive_int("NOISEWISE_MONITOR_WINDOW", defaults.monitor_window),
            request_timeout_s=request_timeout(),
            auth=auth_from_env(env),
        )

    @property
    def alias(self) -> str | None:
        """The alias in ``NAME@ALIAS`` (``champion`` for a bare ``NAME``), None for ``NAME/VERSION``."""
        ref = self.model.removeprefix("models:/")
        if "@" in ref:
            return ref.split("@", 1)[1]
        return None if "/" in ref else "champion"


# ------------------------------------------------------------------------------------------ reference

@dataclass(frozen=True)
class Variable:
    """One environment variable of the reference: its name, default as shown, and what it does."""

    env: str
    default: str
    description: str
    field: str = ""  # the Settings field it sets; "" for variables read elsewhere
    read_by: str = "services/settings.py"


# Read by services/auth.py into Settings.auth.
AUTH_VARIABLES: tuple[Variable, ...] = (
    Variable(KEYS_ENV, "(none)", "comma-separated API keys, each at least 16 visible ASCII characters "
             "(`python -m noisewise.services.auth new` makes one)", "auth", "services/auth.py"),
    Variable(KEYS_FILE_ENV, "(none)", "file of hashed keys, `sha256:<64 hex digits>` a line", "auth",
             "services/auth.py"),
    Variable(PREDICT_ENV, "`0`", "`1`: `/predict`, `/predict_image` and `/model` need a key", "auth",
             "services/auth.py"),
    Variable(METRICS_ENV, "`0`", "`1`: `/metrics` needs a key", "auth", "services/auth.py"),
)

# Where noisewise keeps its state, and the commands' own key: read by the registry, the store and the
# commands, not only the service.
OTHER_VARIABLES: tuple[Variable, ...] = (
    Variable(HOME_ENV, f"`./{DEFAULT_HOME}`", "directory for local state: the MLflow store `mlflow.db` and "
             "`artifacts/` (unless `MLFLOW_TRACKING_URI` is set), the store `store.db`, Evidently workspace "
             "`evidently/`. Relative paths are taken from the working directory; a command that has to create "
             "it says so on stderr", read_by="models/registry.py"),
    Variable("MLFLOW_TRACKING_URI", f"SQLite under `{HOME_ENV}`", "MLflow tracking server or store holding the "
             "model registry (e.g. `http://mlflow:5000`)", read_by="models/registry.py"),
    Variable("NOISEWISE_STORE_URL", f"SQLite under `{HOME_ENV}`", "SQLAlchemy URL of the predictions and "
             "feedback store (e.g. `postgresql+psycopg://user:pass@host:5432/noisewise`)",
             read_by="monitoring/store.py"),
    Variable("NOISEWISE_API_KEY", "(none)", "the key the `noisewise` commands send to a service that needs one "
             "(`Authorization: Bearer`); `--api-key` overrides it", read_by="services/client.py"),
    Variable("NOISEWISE_EXAMPLE_REQUEST", "(none)", "a path: the start-up check writes the served version's "
             "example `/predict` body there (`noisewise serve` sets it for the curl it prints)",
             read_by="services/service.py"),
    Variable("OMP_WAIT_POLICY", "`PASSIVE` in the service", "OpenMP's idle threads: the service sets `PASSIVE` "
             "(torch's intra-op threads sleep between parallel regions instead of spinning on the cores that "
             "parse requests) unless the variable is set; `ACTIVE` keeps them spinning",
             read_by="services/service.py"),
)


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "`1`" if value else "`0`"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return f"`{value}`"


def reference() -> list[Variable]:
    """Every environment variable of the service, in the order of :class:`Settings`' fields (the auth variables
    where ``auth`` is), then the state variables read elsewhere."""
    out: list[Variable] = []
    for f in fields(Settings):
        if f.name == "auth":
            out.extend(AUTH_VARIABLES)
        elif "env" in f.metadata:
            shown = f.metadata["shown"] or _shown(f.default)
            out.append(Variable(f.metadata["env"], shown, f.metadata["description"], f.name))
    return out + list(OTHER_VARIABLES)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown() -> str:
    """docs/settings.md: the reference as Markdown tables."""
    rows = reference()
    service = [v for v in rows if v.field]
    state = [v for v in rows if not v.field]
    lines = [
        "# Settings reference",
        "",
        f"<!-- generated from noisewise.services.settings; do not edit: run `{REGENERATE}` -->",
        "",
        ("The service reads these environment variables once at start and stops with one line naming the "
         "variable when a value is unusable. Flags take `1`/`0` (or `true`/`false`, `yes`/`no`, `on`/`off`); "
         "an empty value means the default."),
        "",
        "## Service",
        "",
        "| variable | field | default | meaning |",
        "|---|---|---|---|",
    ]
    lines += [f"| `{v.env}` | `{v.field}` | {_cell(v.default)} | {_cell(v.description)} |" for v in service]
    lines += [
        "",
        ("With API keys configured, `/feedback`, `/suspects`, `/reload` and every route not listed as open in "
         "`services/auth.py` need `Authorization: Bearer KEY`; without keys the service logs a warning."),
        "",
        "## State and commands",
        "",
        ("Where models, the registry and the store live (read by the service and by every `noisewise` "
         "command), the key the commands send, and OpenMP's wait policy, which the service sets."),
        "",
        "| variable | read by | default | meaning |",
        "|---|---|---|---|",
    ]
    lines += [f"| `{v.env}` | `{v.read_by}` | {_cell(v.default)} | {_cell(v.description)} |" for v in state]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ NOISEWISE_HOME

def home_path(environ: Mapping[str, str] | None = None) -> Path:
    """``NOISEWISE_HOME`` (default ``./.noisewise``) as an absolute path; nothing is created."""
    env = os.environ if environ is None else environ
    text = env.get(HOME_ENV, "").strip() or DEFAULT_HOME
    return Path(text).expanduser().resolve()


def ensure_home(environ: Mapping[str, str] | None = None, stream: TextIO | None = None) -> Path:
    """``NOISEWISE_HOME`` as an absolute path, created when missing.

    A directory this call creates is reported on ``stream`` (stderr by default): a fresh home holds no
    models and no store, so the command that follows would only say that the model is missing.

    Parameters
    ----------
    environ
        The environment to read ``NOISEWISE_HOME`` from (``os.environ`` when None).
    stream
        Where the warning goes (``sys.stderr`` when None).

    Returns
    -------
    Path
        The home directory, which exists.

    Raises
    ------
    SettingsError
        When the path exists and is not a directory.
    """
    home = home_path(environ)
    if home.is_dir():
        return home
    try:
        home.mkdir(parents=True)
    except FileExistsError:
        # another process created it in between, or it is a file
        if not home.is_dir():
            raise SettingsError(f"{HOME_ENV}: {home} exists and is not a directory") from None
        return home
    print(new_home_warning(home, environ), file=sys.stderr if stream is None else stream, flush=True)
    return home


def new_home_warning(home: Path, environ: Mapping[str, str] | None = None) -> str:
    """The stderr line for a ``NOISEWISE_HOME`` that did not exist and was just created."""
    env = os.environ if environ is None else environ
    how = (f"{HOME_ENV} is set to {env[HOME_ENV]!r}" if env.get(HOME_ENV, "").strip()
           else f"{HOME_ENV} is not set, so ./{DEFAULT_HOME} under the working directory is used")
    return (f"noisewise: warning: created a new, empty state directory {home} ({how}); it holds no models and "
            f"no store yet. To use an existing one, set {HOME_ENV}=/absolute/path/to/{DEFAULT_HOME} (or run from "
            f"the directory that holds it); for a registry elsewhere set MLFLOW_TRACKING_URI.")


# ------------------------------------------------------------------------------------------ command line

def main(argv: Sequence[str] | None = None) -> int:
    """``python -m noisewise.services.settings --markdown``: print docs/settings.md."""
    parser = argparse.ArgumentParser(prog="python -m noisewise.services.settings",
                                     description="The environment variables noisewise reads.")
    parser.add_argument("--markdown", action="store_true",
                        help="print the reference as Markdown (the content of docs/settings.md)")
    args = parser.parse_args(argv)
    if args.markdown:
        sys.stdout.write(markdown())
    else:  # which variables are set, never their values (API keys must not reach a terminal log)
        for v in reference():
            state = "set" if os.environ.get(v.env, "").strip() else "unset, default " + v.default.strip("`")
            print(f"{v.env:<32} {state}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
