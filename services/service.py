"""The noisewise BentoML service: a registered model with its calibration, uncertainty on every prediction.

Routes (JSON unless said otherwise; the OpenAPI document is at ``/docs.json``):

- ``POST /predict``: ``{"inputs": [...]}`` (arrays shaped like the model input, or flat vectors) or
  ``{"images": ["<base64 PNG/JPEG>", ...]}`` -> ``{"predictions": [...], "guarantees": {...}}``: each
  guarantee's kind and target in short, the full block with ``"explain": true``.
- ``POST /predict_image``: the same for ``multipart/form-data`` uploads, files in the field ``images``.
- ``GET /model`` (or ``POST``): name, version, alias, classes, input spec, calibration summary (the full
  guarantees), serving settings.
- ``POST /feedback``: labels for served predictions (``services/feedback_api.py``), stored durably and
  idempotently in the store (``monitoring/store.py``) and scored at once for label quality.
- ``POST /suspects``: suspected annotation errors in the feedback, most suspicious first.
- ``POST /reload``: serve the version the alias points to now (also checked every NOISEWISE_RELOAD_INTERVAL_S).
- ``/healthz``, ``/livez``, ``/readyz`` (ready once the model is loaded and has run once), ``/metrics``:
  BentoML's own.

With API keys configured (``services/auth.py``), ``/feedback``, ``/suspects`` and ``/reload`` need
``Authorization: Bearer KEY`` (``/predict``, ``/predict_image``, ``/model`` with ``NOISEWISE_AUTH_PREDICT=1``,
``/metrics`` with ``NOISEWISE_AUTH_METRICS=1``); a missing or wrong key gets 401. The OpenAPI document says
which routes need a key under the running configuration (``bearerAuth``). Limits: body size, inputs
per request, image pixels and decoded image bytes get 413, a prediction waiting past
``NOISEWISE_REQUEST_TIMEOUT_S`` (to decode its images, or for its forward pass) 408. Images are decoded on
threads of their own with a bounded queue (``services/batching.py``, :class:`WorkQueue`), never on the threads
``/feedback`` and ``/suspects`` use.

Bad input is answered with 400 and :class:`noisewise.services.schemas.ErrorResponse` (``{"error": "inputs[3]:
expected ...", "detail": [...]}``), never a 500. Requests are merged across callers into one forward pass
per batch (``services/batching.py``; ``NOISEWISE_BATCHING=0`` turns it off). Every prediction is stored
before its response is sent (``services/recording.py``), so feedback can name it at once: predictions the
store cannot take are not sent, the request gets 503 with ``Retry-After``. Metrics:
``monitoring/metrics.py``. Configuration: ``services/settings.py``.

Start-up: ``bentoml serve noisewise.services.service:Noisewise`` first checks the model and the store once,
before any worker starts (``check_model``: the version's artifacts against their recorded digests and its
calibration document, in a forked child, without building the network or importing torch; see
``services/startup_check.py``): a missing, uncalibrated, tampered or refused model, or a store that cannot be
opened, prints one line and the server exits with status 3. The `bentoml serve` process forks the check as
soon as it imports this module, so that the check overlaps the rest of its start-up; the deployment hook waits
for it before any worker starts. The worker then loads the model, once.
"""

# ruff: noqa: E402 - the model check is forked before the imports below, which take seconds

from __future__ import annotations

# First, before the heavy imports: in the `bentoml serve` process (only there), fork the model check now.
from noisewise.services import startup_check

startup_check.start_check_early()

import os

# Before torch loads OpenMP, which reads it once. OpenMP's default keeps each idle intra-op thread spinning
# for a while after every parallel region; between the ops of the uncertainty path and the Python work of a
# pass those spins burn the core that the event loop needs to parse the next requests. PASSIVE threads sleep
# at once (docs/serving.md: +7.6% /predict throughput for noisewise in a 6-round A/B, nothing lost for plain
# BentoML; a 12-round run after it did not confirm the gain).
# An explicit OMP_WAIT_POLICY wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import asyncio
import dataclasses
import logging
import sys
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import bentoml
import numpy as np
from pydantic import BaseModel, ConfigDict, PrivateAttr, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import noisewise
from noisewise.monitoring import metrics
from noisewise.services import bentoml_patches
from noisewise.services.auth import ApiKeyAuth, AuthConfig
from noisewise.services.body_limit import BodyLimit
from noisewise.services.batching import RETRY_AFTER_S, Batcher, Overloaded, WorkQueue
from noisewise.services.recording import Recorder, stored_row
from noisewise.services.schemas import (
    ErrorResponse,
    Guarantees,
    GuaranteesSummary,
    ImageUpload,
    InputInfo,
    InputSpec,
    ModelInfo,
    ModelRef,
    OODResult,
    PredictRequest,
    Prediction,
    PredictResponse,
    ServingInfo,
    TopK,
    empty_set_reason,
    error_response,
    error_status,
    finite_or_none,
    guarantees_from,
    has_json_booleans,
    images_batch,
    predict_response_json,
)
from noisewise.services.feedback_api import FeedbackRequest, FeedbackResponse, SuspectsRequest, answer_feedback
from noisewise.services.settings import Settings, SettingsError
from noisewise.services.startup_check import (  # noqa: F401 - the check's API, also importable from here
    EXAMPLE_REQUEST_ENV,
    EXIT_MODEL,
    CheckedVersion,
    StartupError,
    check_artifacts,
    check_model_here,
    open_store,
    run_check_forked,
    write_example_request,
)

#: Threads that decode request images, per worker, and requests queued or decoding at most (503 beyond):
#: bounded so that decoding never takes the threads of /feedback and /suspects, nor unbounded memory.
DECODE_THREADS = 2
DECODE_QUEUE = 64
#: Seconds a client should wait before it retries a prediction the store could not take.
STORE_RETRY_AFTER_S = 5
log = logging.getLogger("bentoml.noisewise")  # under "bentoml" so that BentoML's server logging shows it


@dataclass
class Served:
    """A loaded model ready to serve."""

    name: str
    version: str
    forward: Callable[[np.ndarray], Any]  # a batch's network pass (Predictor.forward_network)
    finish: Callable[[Any], list]  # forward's outputs -> one prediction per input (uncertainty, host copy)
    spec: InputSpec
    info: ModelInfo
    guarantees: Guarantees
    weights: str
    calibration: Any  # models.calibrate.Calibration
    ref: ModelRef = dataclasses.field(init=False)
    summary: GuaranteesSummary = dataclasses.field(init=False)  # the short guarantees sent by default
    threshold: float | None = dataclasses.field(init=False)  # certified threshold on the score; None: none

    def __post_init__(self) -> None:
        self.ref = ModelRef(name=self.name, version=self.version)
        self.summary = self.guarantees.summary()
        self.threshold = finite_or_none(float(self.calibration.certified.threshold))


def load_served(settings: Settings) -> Served:
    """Load ``settings.model`` with its calibration, run it once, describe it; :class:`StartupError` if
    it is missing, uncalibrated or broken."""
    from noisewise.models.nets import pick_device
    from noisewise.models.predictor import Predictor
    from noisewise.models.registry import RegistryError, load_model

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no progress bars in server logs
    ref = settings.model
    try:
        device = pick_device(settings.device)
        loaded = load_model(ref, device=device)
    except (RegistryError, ValueError) as err:
        raise StartupError(f"cannot serve model {ref!r}: {_one_line(err)}") from None
    except Exception as err:  # a corrupt store or an artifact this version of noisewise cannot read
        raise StartupError(f"cannot load model {ref!r}: {type(err).__name__}: {_one_line(err)}") from None
    label = f"{loaded.name}/{loaded.version}"
    if loaded.calibration is None:
        raise StartupError(
            f"model {ref!r} ({label}) has no calibration: run `noisewise calibrate --model {ref}` and serve the "
            "calibrated version"
        )
    spec = InputSpec(
        shape=tuple(int(d) for d in loaded.spec.input_shape), max_batch=settings.max_batch,
        max_image_pixels=settings.max_image_pixels, max_image_bytes=settings.max_image_bytes,
        input_range=tuple(float(v) for v in loaded.spec.input_range),  # type: ignore[arg-type]
    )
    try:
        predictor = Predictor(loaded.net, loaded.calibration, device=device, top_k=settings.top_k)
        summary = loaded.calibration.summary()
        guarantees = guarantees_from(summary)
        predictor.predict(np.zeros((2, *spec.shape), dtype=np.float32))  # fail now rather than on the first request
    except Exception as err:
        raise StartupError(f"model {ref!r} ({label}) is broken: {type(err).__name__}: {_one_line(err)}") from None
    info = ModelInfo(
        name=loaded.name, version=loaded.version, alias=settings.alias, uri=loaded.uri, run_id=loaded.run_id,
        arch=loaded.spec.arch, classes=list(loaded.spec.class_names),
        input=InputInfo(shape=list(spec.shape), size=spec.size, range=list(spec.input_range),
                        images=spec.image_mode is not None, image_mode=spec.image_mode,
                        preprocess=loaded.spec.preprocess or None),
        calibration=finite_or_none(summary),
        serving=ServingInfo(device=str(predictor.device), batching=settings.batching,
                            batch_max_size=settings.batch_max_size,
                            batch_max_latency_ms=settings.batch_max_latency_ms,
                            max_inputs_per_request=settings.max_batch, top_k=settings.top_k),
    )
    return Served(loaded.name, loaded.version, predictor.forward_network,
                  lambda outputs: predictor.predictions(predictor.forward_uncertainty(*outputs)), spec, info,
                  guarantees, loaded.weights or "", loaded.calibration)


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


class JSONBody(BaseModel):
    """A JSON body as BentoML parses it: any object, documented as ``DOCUMENTED``. The endpoint validates it
    itself, so that every error comes back in one format (with the served model's shape in the message) and
    without BentoML's traceback-per-bad-request in the server log."""

    DOCUMENTED: ClassVar[type[BaseModel]]
    model_config = ConfigDict(extra="allow")
    _parse_error: ValidationError | None = PrivateAttr(None)

    @classmethod
    def model_json_schema(cls, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return cls.DOCUMENTED.model_json_schema(*args, **kwargs)

    @classmethod
    def model_validate_json(cls, json_data: Any, **kwargs: Any) -> JSONBody:
        try:
            return super().model_validate_json(json_data, **kwargs)
        except ValidationError as err:  # not JSON, or not an object: answered by the endpoint like any bad input
            body = cls.model_construct()
            body._parse_error = err
            return body

    def fields(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class PredictBody(JSONBody):
    DOCUMENTED = PredictRequest
    _booleans: bool = PrivateAttr(True)  # False: the raw body has no JSON true/false (a cheaper validation)

    @classmethod
    def model_validate_json(cls, json_data: Any, **kwargs: Any) -> PredictBody:
        body = super().model_validate_json(json_data, **kwargs)
        body._booleans = not isinstance(json_data, (str, bytes, bytearray)) or has_json_booleans(json_data)
        return body


class FeedbackBody(JSONBody):
    DOCUMENTED = FeedbackRequest


class SuspectsBody(JSONBody):
    DOCUMENTED = SuspectsRequest


API_DESCRIPTION = """\
Predictions from a classifier trained on noisy labels, each with a **conformal prediction set** (noise-aware),
an **out-of-distribution p-value** and a **certified accept/abstain decision**, and the way back for feedback
labels.

- `POST /predict` (JSON) and `POST /predict_image` (multipart uploads): one prediction per input. `score` is the
  selective score of the abstention rule (MaxLogit-pNorm or MSP: not a probability), accepted when it reaches
  `threshold`; an empty `prediction_set` comes with a `set_reason`. `guarantees` gives each guarantee's kind
  and target in short; send `"explain": true` for the full block.
- `GET /model` (or `POST`): the served model, its classes and input, the full guarantees with their
  conditions and assumptions, the certified risk-coverage frontier.
- `POST /feedback`, `POST /suspects`, `POST /reload`: labels for served predictions, suspected annotation
  errors, serving the version the alias points to now.
- `/healthz`, `/livez`, `/readyz`, `/metrics`: probes and Prometheus metrics.

**Authentication**: with API keys configured (`NOISEWISE_API_KEYS` or `NOISEWISE_API_KEYS_FILE`), the
routes marked with a lock need `Authorization: Bearer KEY` (`bearerAuth`); a missing or wrong key gets 401.
Which routes those are follows the running configuration (`NOISEWISE_AUTH_PREDICT`, `NOISEWISE_AUTH_METRICS`).

This document: [docs.json](./docs.json).
"""

#: Tag descriptions (BentoML's own name the tags; operations refer to them by name).
TAG_DESCRIPTIONS = {"Service APIs": "predictions, the served model, feedback",
                    "Infrastructure": "health probes and Prometheus metrics"}
BEARER_SCHEME = {"type": "http", "scheme": "bearer",
                 "description": "an API key of NOISEWISE_API_KEYS or NOISEWISE_API_KEYS_FILE, sent as "
                                "`Authorization: Bearer KEY` (make one with `python -m noisewise.services.auth new`)"}
UNAUTHORIZED = "missing or wrong API key (`Authorization: Bearer KEY`)"


def auth_config() -> AuthConfig:
    """The API-key settings the running service enforces (``services/auth.py``); a configuration that cannot
    be read protects every route but the open ones, as the middleware does."""
    try:
        return Settings.from_env().auth
    except SettingsError:
        return AuthConfig(deny_all=True)


class NoisewiseService(bentoml.Service):
    """The BentoML service object, with noisewise's own OpenAPI document: title, description and version,
    error answers, the bearer security scheme, ``GET /model``."""

    ERRORS: ClassVar[dict[int, str]] = {
        400: "invalid input: every problem with its location and the expected form",
        401: UNAUTHORIZED,
        408: "the prediction (decoding its images, or its forward pass) waited longer than "
             "NOISEWISE_REQUEST_TIMEOUT_S",
        413: "request body over NOISEWISE_MAX_BODY_BYTES, more inputs than NOISEWISE_MAX_BATCH, or an image over "
             "NOISEWISE_MAX_IMAGE_PIXELS or NOISEWISE_MAX_IMAGE_BYTES",
        503: "overloaded (the request waited longer than NOISEWISE_BATCH_MAX_LATENCY_MS, or the image decoding "
             "queue is full), or the store cannot take the predictions (nothing is served that was not stored); "
             "retry after the Retry-After header's seconds",
    }
    FEEDBACK_ERRORS: ClassVar[dict[int, str]] = {
        207: "some items were stored (or were duplicates) and some rejected: see each item's status",
        400: "malformed body, or every item rejected for different reasons",
        401: UNAUTHORIZED,
        404: "every item names an unknown prediction id",
        409: "every item conflicts with a label already given by the same annotator",
        413: "more items than NOISEWISE_MAX_FEEDBACK_ITEMS, or body over NOISEWISE_MAX_BODY_BYTES",
        422: "every item has an unknown label",
        503: "the store is off (NOISEWISE_STORE=0) or unavailable",
    }
    STORE_ERRORS: ClassVar[dict[int, str]] = {
        400: "malformed body",
        401: UNAUTHORIZED,
        503: "the store is off (NOISEWISE_STORE=0) or unavailable",
    }
    MODEL_ERRORS: ClassVar[dict[int, str]] = {400: "malformed body", 401: UNAUTHORIZED}
    RELOAD_ERRORS: ClassVar[dict[int, str]] = {
        400: "malformed body",
        401: UNAUTHORIZED,
        409: "the alias names no version (deleted), or a version that cannot be served: the service keeps "
             "serving the version it has",
    }
    # /feedback answers these with the per-item FeedbackResponse body, not an ErrorResponse
    FEEDBACK_PER_ITEM: ClassVar[tuple[int, ...]] = (207, 404, 409, 422)

    @property
    def openapi_spec(self):
        import attr
        from bentoml._internal.service.openapi.specification import (
            Info,
            MediaType,
            Reference,
            Schema,
            Tag,
        )
        from bentoml._internal.service.openapi.specification import (
            Response as OpenAPIResponse,
        )

        spec = super().openapi_spec
        auth = auth_config()
        secured = [{"bearerAuth": []}]
        ref = "#/components/schemas/{model}"
        schema = ErrorResponse.model_json_schema(ref_template=ref)
        # BentoML 1.4 builds components as a plain {"schemas": {...}} dict
        components = spec.components["schemas"] if isinstance(spec.components, dict) else spec.components.schemas
        for name, definition in {**schema.pop("$defs", {}), "ErrorResponse": schema}.items():
            components[name] = Schema(**definition)
        _no_file_type(components)
        for route, errors in (("/predict", self.ERRORS), ("/predict_image", self.ERRORS),
                              ("/feedback", self.FEEDBACK_ERRORS), ("/suspects", self.STORE_ERRORS),
                              ("/reload", self.RELOAD_ERRORS), ("/model", self.MODEL_ERRORS)):
            if route not in spec.paths:
                continue
            operation = spec.paths[route].post
            responses = operation["responses"]
            for status, description in errors.items():
                if status == 401 and not auth.requires_key(route):
                    continue
                target = Reference(ref.format(model="ErrorResponse"))
                per_item = Reference(ref.format(model="FeedbackResponseIODescriptor"))
                if route == "/feedback" and status in self.FEEDBACK_PER_ITEM:
                    target = per_item
                elif route == "/feedback" and status == 400:  # malformed body, or items rejected for mixed reasons
                    target = Schema(oneOf=[target, per_item])
                responses[status] = OpenAPIResponse(description=description,
                                                    content={"application/json": MediaType(schema=target)})
            if auth.requires_key(route):
                operation["security"] = secured
        if "/model" in spec.paths:
            post = spec.paths["/model"].post
            get = {key: post[key] for key in ("tags", "description") if key in post}
            get["responses"] = {status: answer for status, answer in post["responses"].items() if status != 400}
            get["operationId"] = f"{post.get('operationId', 'model_info')}_get"
            if "security" in post:
                get["security"] = secured
            spec.paths["/model"] = attr.evolve(spec.paths["/model"], get=get)
        if "/metrics" in spec.paths:
            metrics_get = {"responses": {200: {"description": "Prometheus metrics, text exposition format"}},
                           "tags": ["Infrastructure"], "description": "Prometheus metrics: noisewise's own "
                           "(predictions, uncertainty, feedback, label noise) and BentoML's (requests, latency)."}
            if auth.requires_key("/metrics"):
                metrics_get["responses"][401] = {"description": UNAUTHORIZED}
                metrics_get["security"] = secured
            spec.paths["/metrics"] = attr.evolve(spec.paths["/metrics"], get=metrics_get)
        spec.components["securitySchemes"] = {"bearerAuth": BEARER_SCHEME}
        # pydantic v2 writes JSON Schema 2020-12 (nullable fields as anyOf [..., {"type": "null"}]): the dialect
        # of OpenAPI 3.1, not of the 3.0 that BentoML declares
        return attr.evolve(
            spec, openapi="3.1.0",
            info=Info(title="noisewise", version=noisewise.__version__, description=API_DESCRIPTION),
            tags=[Tag(name=tag.name, description=TAG_DESCRIPTIONS.get(tag.name, tag.description))
                  for tag in spec.tags or ()],
        )


def _no_file_type(components: dict) -> None:
    """BentoML documents an uploaded file as ``{"type": "file"}``, which is no JSON Schema type: make it
    ``{"type": "string", "format": "binary"}``, as OpenAPI describes files."""
    import attr
    from bentoml._internal.service.openapi.specification import Schema

    def fixed(node):
        if isinstance(node, dict):
            node = {key: fixed(value) for key, value in node.items()}
            return {**node, "type": "string", "format": "binary"} if node.get("type") == "file" else node
        if not isinstance(node, Schema):
            return node
        changes = {}
        if node.type == "file":
            changes["type"], changes["format"] = "string", "binary"
        if node.items is not None:
            changes["items"] = fixed(node.items)
        if node.properties:
            changes["properties"] = {key: fixed(value) for key, value in node.properties.items()}
        return attr.evolve(node, **changes) if changes else node

    for name, schema in list(components.items()):
        components[name] = fixed(schema)


class ServiceArgs(BaseModel):
    """``bentoml serve/build --arg gpu=1``: GPUs BentoML reserves per worker (bentofile.yaml sets 1 for the
    Bento). The device itself follows NOISEWISE_DEVICE (``auto``: cuda when visible)."""

    gpu: int = 0


_args = bentoml.use_arguments(ServiceArgs)


def _freeze_heap() -> None:
    """Move every object alive now (the model, torch, MLflow, BentoML: hundreds of thousands of long-lived
    objects) out of the garbage collector's reach, so that its full collections, which the allocations of
    ordinary request handling trigger, no longer rescan them: they paused every request for tens of ms
    (single-item feedback from 64 clients: p99 289 ms before, 57 ms after). Called again after a hot reload,
    once the old model is released: everything is unfrozen, collected, then frozen again."""
    import gc

    gc.unfreeze()
    gc.collect()
    gc.freeze()


@bentoml.service(
    service_class=NoisewiseService,
    **({"resources": {"gpu": _args.gpu}} if _args.gpu else {}),
    traffic={"timeout": 60},
    workers=1,  # one process owns the model and batches for it; scale with replicas, not workers
)
class Noisewise:
    """Predictions with noise-aware conformal sets, OOD p-values and certified abstention."""

    def __init__(self) -> None:
        self.ready = False
        self.store = self.recorder = None
        try:
            self.settings = Settings.from_env()
            served = load_served(self.settings)
            if self.settings.store:
                self.store = open_store()
        except (SettingsError, StartupError) as err:
            _fail(str(err))
        self.served = served
        self.batcher = Batcher(self._forward_network, self._finish, enabled=self.settings.batching,
                               max_batch_size=self.settings.batch_max_size,
                               max_latency_ms=self.settings.batch_max_latency_ms)
        self.decoder = WorkQueue(threads=DECODE_THREADS, max_pending=DECODE_QUEUE)
        if self.store is not None:
            self.recorder = Recorder(self.store)
        metrics.start_series(served.calibration.class_names)
        metrics.set_model(served.name, served.version, self.settings.alias, served.info.calibration.model_dump())
        self._reload_lock = threading.Lock()
        self._stop = threading.Event()
        self._background = threading.Thread(target=self._watch, name="noisewise-watch", daemon=True)
        self._background.start()
        _freeze_heap()
        self.ready = True
        log.info("noisewise: serving %s/%s on %s (batching %s, store %s)", served.name, served.version,
                 served.info.serving.device, "on" if self.settings.batching else "off",
                 _safe_url(self.store.url) if self.store is not None else "off")

    def _forward_network(self, x: np.ndarray) -> tuple[Served, Any]:
        """The network's pass with the model served now, kept with that model, so that a hot reload between the
        pass and the response cannot mislabel it (the batcher's model thread)."""
        served = self.served
        return served, served.forward(x)

    @staticmethod
    def _finish(passed: tuple[Served, Any]) -> list[tuple[Served, Any]]:
        """The rest of the pass with the model that ran it: one (model, prediction) per input (the batcher's
        finishing thread)."""
        served, outputs = passed
        return [(served, out) for out in served.finish(outputs)]

    @bentoml.on_deployment
    def check_model() -> None:
        """Runs once in the ``bentoml serve`` process before workers start: a model that cannot be served
        stops the server here with one line and exit status 3 (a worker that failed instead would be
        restarted forever by BentoML's process manager). The check (:func:`check_model_here`) verifies the
        artifacts without building the network, in a forked child: no second interpreter start-up, and the
        long-lived server process keeps neither torch, MLflow nor a CUDA context. The child was forked when
        this process imported the service (``startup_check.start_check_early``); here it is waited for."""
        status = startup_check.wait_for_check()
        if status != 0:
            if status != EXIT_MODEL:
                print(f"noisewise: error: the model check crashed (exit status {status})", file=sys.stderr,
                      flush=True)
            raise SystemExit(EXIT_MODEL)

    def __is_ready__(self) -> bool:
        return self.ready and (self.store is None or self.store.health() is None)

    @bentoml.api(route="/predict")
    async def predict(self, body: PredictBody, /) -> PredictResponse:
        """Predict a batch: `{"inputs": [...]}` (arrays shaped like the model input, or flat vectors) or
        `{"images": ["<base64 PNG/JPEG>", ...]}`. One prediction per item, each with its conformal set,
        OOD p-value and accept/abstain decision (its `score` against the certified `threshold`); `guarantees`
        says what those guarantee: each part's kind and target, the full block with `"explain": true`."""
        if body._parse_error is not None:
            return _bad_request(body._parse_error)
        raw = body.fields()
        spec, deadline = self.served.spec, self._deadline()
        try:
            if raw.get("images") is not None:  # decoding can take a while: on the decoding threads
                request = await self._decode(
                    lambda stop: PredictRequest.model_validate(raw, context={"input": spec, "stop": stop}), deadline)
            else:
                request = PredictRequest.model_validate(raw, context={"input": spec, "booleans": body._booleans})
        except ValidationError as err:
            return _bad_request(err)
        except _Refused as refused:
            return refused.response
        return await self._answer(request.batch, request.explain, deadline)

    @bentoml.api(route="/predict_image")
    async def predict_image(self, upload: ImageUpload, /) -> PredictResponse:
        """Predict uploaded PNG/JPEG files (`multipart/form-data`, field `images`, repeat it for a batch; field
        `explain=true` for the full guarantees block)."""
        spec, deadline = self.served.spec, self._deadline()
        try:
            batch = await self._decode(
                lambda stop: images_batch([path.read_bytes() for path in upload.images], spec, stop), deadline)
        except ValidationError as err:
            return _bad_request(err)
        except _Refused as refused:
            return refused.response
        return await self._answer(batch, upload.explain, deadline)

    def _deadline(self) -> float | None:
        """When a prediction request arriving now must be answered (event-loop time): NOISEWISE_REQUEST_TIMEOUT_S
        bounds decoding and forward pass together, so that the 408 comes before the server's own timeout (504)."""
        timeout = self.settings.request_timeout_s
        return asyncio.get_running_loop().time() + timeout if timeout else None

    @staticmethod
    def _left(deadline: float | None) -> float | None:
        return None if deadline is None else max(0.0, deadline - asyncio.get_running_loop().time())

    async def _decode(self, work: Callable[[threading.Event], Any], deadline: float | None) -> Any:
        """``work(stop)`` on the decoding threads before ``deadline``; :class:`_Refused` (503 or 408) when the
        queue is full or the time is up. The work of a request that gave up is never started, or stops before
        its next image."""
        try:
            return await self.decoder.run(work, timeout=self._left(deadline))
        except Overloaded as err:
            raise _Refused(_error(503, str(err), retry_after=RETRY_AFTER_S)) from None
        except TimeoutError:
            raise _Refused(_error(408, f"the images were not decoded within {self.settings.request_timeout_s:g} s "
                                       "(NOISEWISE_REQUEST_TIMEOUT_S); nothing was recorded, retry later")) from None

    @bentoml.api(route="/model")
    async def model_info(self) -> ModelInfo:
        """The served model: name, version, alias, classes, input spec, calibration summary (the full
        guarantees with their conditions and assumptions, the certified risk-coverage frontier, the noise
        record) and serving settings. Also answered to `GET /model`."""
        return self.served.info

    async def _answer(self, batch: np.ndarray, explain: bool = False,
                      deadline: float | None = None) -> Response:
        try:
            outputs = await self._forward(batch, deadline)
        except Overloaded as err:
            return _error(503, str(err), retry_after=RETRY_AFTER_S)
        except TimeoutError:
            return _error(408, f"no prediction within {self.settings.request_timeout_s:g} s "
                               "(NOISEWISE_REQUEST_TIMEOUT_S); nothing was recorded, retry later")
        predictions = [_prediction(out, served) for served, out in outputs]
        metrics.observe_predictions(predictions)
        if self.recorder is not None:
            try:
                await self.recorder.record([stored_row(p, served, out) for p, (served, out) in zip(predictions, outputs)])
            except Exception as err:  # logged and counted by the recorder
                # a prediction that is not stored cannot take feedback: none is served that was not stored
                return _error(503, f"the store cannot take the predictions ({type(err).__name__}: {_one_line(err)}"
                                   f"); nothing was served, retry later", retry_after=STORE_RETRY_AFTER_S)
        served = outputs[0][0]
        # written directly, byte for byte the PredictResponse that the annotation documents
        return Response(predict_response_json(predictions, served.guarantees if explain else served.summary),
                        media_type="application/json")

    async def _forward(self, batch: np.ndarray, deadline: float | None) -> list:
        """The batcher's outputs, or TimeoutError past ``deadline``. Not asyncio.wait_for:
        BentoML's dispatcher turns a cancelled wait into its overload fallback (a 503, not the 408). A forward
        pass the request already joined still runs; its outputs for this request are dropped, never recorded."""
        task = asyncio.ensure_future(self.batcher(batch))
        try:
            done, _ = await asyncio.wait({task}, timeout=self._left(deadline))
        finally:
            if not task.done():  # timed out, or the client went away
                task.cancel()
                task.add_done_callback(_quiet)
        if not done:
            raise TimeoutError
        return task.result()

    @bentoml.api(route="/feedback")
    async def feedback(self, body: FeedbackBody, /) -> FeedbackResponse:
        """Labels for served predictions: `{"items": [{"prediction_id", "label", "annotator"?, "audited"?}]}`.
        Labels are class names or indices. Idempotent: an item sent again is a duplicate, not counted twice.
        Each item is scored at once for label quality (a suspected annotation error or not). Bad items get
        their own 4xx status and message; the others are stored. Every item acknowledged (201/200) is on
        disk when the response is sent."""
        # one function answers here and in the feedback lane (services/feedback_lane.py), which serves
        # /feedback outside BentoML's middleware unless NOISEWISE_FEEDBACK_LANE=0
        parsed = body.fields() if body._parse_error is None else body._parse_error
        status, content = await answer_feedback(parsed, self.store, self.served.calibration,
                                                self.settings.max_feedback_items)
        return Response(content, status_code=status, media_type="application/json")

    @bentoml.api(route="/suspects")
    async def suspects(self, body: SuspectsBody, /) -> dict:
        """Suspected annotation errors in the feedback, most suspicious first, with the model's proposed label,
        for re-annotation: `{"since"?: ISO time, "class_name"?: str, "limit"?: int, "cursor"?: str}`. Feedback on
        inputs flagged OOD is listed apart (`ood`): the model cannot judge those labels. `next_cursor` pages on."""
        if body._parse_error is not None:
            return _bad_request(body._parse_error)
        if self.store is None:
            return _error(503, "suspects are off: this service runs with NOISEWISE_STORE=0")
        try:
            request = SuspectsRequest.model_validate(body.fields())
        except ValidationError as err:
            return _bad_request(err)
        names = self.served.calibration.class_names
        if request.class_name is not None and request.class_name not in names:
            return _error(422, f"class_name: unknown class {request.class_name[:40]!r}: expected one of "
                               f"{', '.join(repr(n) for n in names[:20])}")
        try:  # filtered, ranked and paged in SQL: one page of rows is read, whatever the table's size
            result = await asyncio.to_thread(self.store.suspects, self.served.name, names, since=request.since,
                                             class_name=request.class_name, limit=request.limit,
                                             cursor=request.cursor)
        except Exception as err:
            return _error(503, f"the store is unavailable ({type(err).__name__})")
        return JSONResponse(finite_or_none(result))

    @bentoml.api(route="/reload")
    async def reload(self) -> dict:
        """Check the registry now: serve the version the alias points to, if it moved (the service also checks
        every NOISEWISE_RELOAD_INTERVAL_S). In-flight requests finish on the version they started with."""
        previous = self.served.version
        try:
            changed = await asyncio.to_thread(self._reload_if_moved)
        except StartupError as err:
            return _error(409, f"cannot reload, still serving {self.served.name}/{previous}: {err}")
        return {"reloaded": changed, "name": self.served.name, "version": self.served.version,
                "previous_version": previous}

    def _reload_if_moved(self) -> bool:
        """Swap to the version the alias points to now, if it moved. Raises StartupError if it cannot be served."""
        if self.settings.alias is None:
            return False
        from noisewise.models.registry import resolve_version

        with self._reload_lock:
            try:
                _, version, _ = resolve_version(self.settings.model)
            except Exception as err:  # the alias was deleted, or the registry cannot be read
                metrics.RELOADS.labels("failed").inc()
                raise StartupError(f"the alias {self.settings.model!r} names no version: {_one_line(err)}") from None
            if version == self.served.version:
                return False
            try:
                new = load_served(self.settings)
            except StartupError:
                metrics.RELOADS.labels("failed").inc()
                raise
            old, self.served = self.served, new  # one reference swap: the next forward pass uses the new model
            metrics.RELOADS.labels("ok").inc()
            metrics.set_model(new.name, new.version, self.settings.alias, new.info.calibration.model_dump())
            log.info("noisewise: hot reload %s/%s -> %s/%s", old.name, old.version, new.name, new.version)
            del old
            _freeze_heap()  # the old model's objects were frozen: collect them, freeze the new ones
            return True

    def _watch(self) -> None:
        """Background work: follow the alias (hot reload) and refresh the feedback gauges."""
        import time

        next_reload = next_gauges = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if self.settings.reload_interval_s and now >= next_reload:
                next_reload = now + self.settings.reload_interval_s
                try:
                    self._reload_if_moved()
                except Exception as err:  # a bad new version or a registry hiccup: keep serving the old one
                    log.error("noisewise: reload check failed: %s", _one_line(err))
            if self.store is not None and self.settings.monitor_interval_s and now >= next_gauges:
                next_gauges = now + self.settings.monitor_interval_s
                try:
                    self.refresh_gauges()
                except Exception as err:
                    log.error("noisewise: refreshing the feedback gauges failed: %s: %s", type(err).__name__,
                              _one_line(err))
            self._stop.wait(0.5)

    def refresh_gauges(self) -> None:
        """Noise rate, realized coverage, suspect share and drift gauges from the store."""
        from noisewise.monitoring.monitor import feedback_state

        served = self.served
        frame = self.store.feedback_frame(window=self.settings.monitor_window, model_name=served.name)
        metrics.set_feedback_gauges(feedback_state(frame, served.calibration))
        report = self.store.latest_report("monitor")
        if report is not None:
            metrics.set_drift_gauges(report.get("drift") or {})

    @bentoml.on_shutdown
    def close(self) -> None:
        if getattr(self, "_stop", None) is not None:
            self._stop.set()
        if getattr(self, "batcher", None) is not None:
            self.batcher.close()
        if getattr(self, "decoder", None) is not None:
            self.decoder.close()
        if getattr(self, "recorder", None) is not None:
            self.recorder.close()
        if getattr(self, "store", None) is not None:
            self.store.close()


async def model_info_get(request: Request) -> Response:
    """``GET /model``: the answer of ``POST /model``, byte for byte (the same model, serialized the same way)."""
    service = bentoml.get_current_service()
    return Response(service.served.info.model_dump_json(), media_type="application/json")


# the service's routes label BentoML's request metrics; any other path shares one label
bentoml_patches.apply(routes={api.route for api in Noisewise.apis.values()})
Noisewise.add_asgi_middleware(ApiKeyAuth)  # added first, so it runs first: no other answer before the key check
Noisewise.add_asgi_middleware(BodyLimit)
# Plain routes besides BentoML's (which are POST only). Mounted apps sit inside the middleware above, so the
# key check covers them as it covers the API routes; BentoML tries them after its own routes.
Noisewise.mount_asgi_app(Starlette(routes=[Route("/model", model_info_get, methods=["GET"])]), path="/",
                         name="noisewise-routes")


def _quiet(task: asyncio.Future) -> None:
    """Retrieve an abandoned task's outcome, so that asyncio does not log it as never retrieved."""
    if not task.cancelled():
        task.exception()


def _bad_request(err: ValidationError) -> JSONResponse:
    return JSONResponse(error_response(err).model_dump(), status_code=error_status(err))


def _error(status: int, message: str, retry_after: int | None = None) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return JSONResponse({"error": message, "detail": []}, status_code=status, headers=headers)


class _Refused(Exception):
    """A request answered before its prediction (decoding queue full, decoding timed out): the answer."""

    def __init__(self, response: JSONResponse):
        super().__init__(response.status_code)
        self.response = response


def _safe_url(url: str) -> str:
    from noisewise.monitoring.store import _safe

    return _safe(url)


def _prediction(out, served: Served) -> Prediction:
    """The response item for one output of the model (``models.predictor.Prediction``): the model's
    confidence is the selective ``score``, shown with the certified ``threshold`` it is compared with.
    Built without per-item validation (``model_construct``): ``out`` is the model's own output."""
    return Prediction.model_construct(
        id=str(uuid.uuid4()), label=out.label, class_name=out.class_name, score=out.confidence,
        threshold=served.threshold, top_k=[TopK.model_construct(**t) for t in out.top_k],
        prediction_set=out.prediction_set, set_reason=empty_set_reason(out.prediction_set, out.is_ood),
        ood=OODResult.model_construct(score=out.ood_score, p_value=out.ood_p_value, is_ood=out.is_ood),
        decision=out.decision, reason=out.reason, model=served.ref)


def _fail(message: str):
    """Stop on a model that cannot be served: one log line, no traceback."""
    log.error("noisewise: %s", message)
    from bentoml._internal.context import server_context

    if server_context.worker_index is not None:
        # a `bentoml serve` worker: exiting here skips uvicorn's traceback; the process manager restarts the
        # worker, which retries (check_model has already stopped the server if the model was never servable)
        logging.shutdown()
        os._exit(EXIT_MODEL)
    raise StartupError(message)


if __name__ == "__main__":
    raise SystemExit(check_model_here())
