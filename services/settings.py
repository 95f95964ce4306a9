"""Serving configuration from ``NOISEWISE_*`` environment variables.

``NOISEWISE_HOME`` and ``MLFLOW_TRACKING_URI`` (where the registry lives) are read by
``models/registry.py``; everything the service itself needs is here, validated up front so that a
bad value stops the server with one line naming the variable.

=================================  =========================  ===============================================
variable                           default                    meaning
=================================  =========================  ===============================================
``NOISEWISE_MODEL``                ``noisewise-demo@champion``  registered model: ``NAME@ALIAS`` or ``NAME/VERSION``
``NOISEWISE_DEVICE``               ``auto``                   ``auto`` (cuda when available), ``cpu``, ``cuda[:N]``
``NOISEWISE_MAX_BATCH``            ``256``                    most inputs (arrays or images) in one request
``NOISEWISE_TOP_K``                ``3``                      classes listed in each prediction's ``top_k``
``NOISEWISE_BATCHING``             ``1``                      adaptive batching across requests (``0`` turns it off)
``NOISEWISE_BATCH_MAX_SIZE``       ``256``                    most inputs in one forward pass
``NOISEWISE_BATCH_MAX_LATENCY_MS`` ``10000``                  a request queued longer than this is shed (503)
``NOISEWISE_MAX_IMAGE_PIXELS``     ``16777216``               largest decoded image (width x height)
``NOISEWISE_MAX_BODY_BYTES``       ``33554432``               largest request body (413 beyond)
``NOISEWISE_MAX_FEEDBACK_ITEMS``   ``1000``                   most items in one ``/feedback`` request (413 beyond)
``NOISEWISE_STORE``                ``1``                      store predictions and accept feedback (``0``: neither)
``NOISEWISE_STORE_URL``            SQLite under the home      predictions + feedback store (SQLAlchemy URL)
``NOISEWISE_RELOAD_INTERVAL_S``    ``5``                      how often the alias is checked for a new version
                                                              (hot reload; ``0``: never, only ``POST /reload``)
``NOISEWISE_MONITOR_INTERVAL_S``   ``10``                     how often the feedback gauges are recomputed
``NOISEWISE_MONITOR_WINDOW``       ``5000``                   most recent feedback items behind those gauges
``NOISEWISE_REQUEST_TIMEOUT_S``    ``30``                     longest wait for a prediction's forward pass (408
                                                              beyond; ``0``: no limit but BentoML's 60 s).
                                                              /feedback is never cut off mid-commit
``NOISEWISE_API_KEYS``             (none)                     comma-separated API keys (``services/auth.py``)
``NOISEWISE_API_KEYS_FILE``        (none)                     file of hashed keys, ``sha256:<hex>`` a line
``NOISEWISE_AUTH_PREDICT``         ``0``                      ``1``: /predict, /predict_image, /model need a key
``NOISEWISE_AUTH_METRICS``         ``0``                      ``1``: /metrics needs a key
=================================  =========================  ===============================================

With keys configured, /feedback, /suspects, /reload and every route not listed as open in
``services/auth.py`` need ``Authorization: Bearer KEY``; without keys the service logs a warning.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from noisewise.services.auth import AuthConfig, auth_from_env

DEFAULT_MODEL = "noisewise-demo@champion"
SERVER_TIMEOUT_S = 60  # BentoML's traffic timeout (services/service.py): it answers 504 past this
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?|mps)$")
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


class SettingsError(ValueError):
    """An environment variable with a value the service cannot use."""


@dataclass(frozen=True)
class Settings:
    model: str = DEFAULT_MODEL
    device: str = "auto"
    max_batch: int = 256
    top_k: int = 3
    batching: bool = True
    batch_max_size: int = 256
    batch_max_latency_ms: int = 10_000
    max_image_pixels: int = 4096 * 4096
    max_body_bytes: int = 32 * 1024 * 1024
    max_feedback_items: int = 1000
    store: bool = True
    reload_interval_s: float = 5.0
    monitor_interval_s: float = 10.0
    monitor_window: int = 5000
    request_timeout_s: float = 30.0
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
            max_body_bytes=positive_int("NOISEWISE_MAX_BODY_BYTES", defaults.max_body_bytes),
            max_feedback_items=positive_int("NOISEWISE_MAX_FEEDBACK_ITEMS", defaults.max_feedback_items),
            store=flag("NOISEWISE_STORE", defaults.store),
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
