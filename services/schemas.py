"""Request and response models of the HTTP API, and the validation that turns a request into a batch.

A request carries either ``inputs`` (arrays shaped like the model input, or flat vectors of the right
length) or ``images`` (base64 PNG/JPEG). Validation runs with an :class:`InputSpec` as pydantic context,
so one pass checks the JSON types, the shapes against the served model, finiteness, the batch limit and
decodes the images; every problem is reported with its location (``inputs[3]``) and the expected form.
Without a context only the model-independent checks run. The context ``{"input": spec, "stop": event}``
may carry a ``threading.Event``: once it is set, decoding stops before the next image (:class:`Cancelled`).
"""

from __future__ import annotations

import base64
import binascii
import io
import itertools
import math
import pathlib
import re
import warnings
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SerializationInfo,
    SerializerFunctionWrapHandler,
    StrictBool,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    WithJsonSchema,
    field_serializer,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

IMAGE_FORMATS = ("PNG", "JPEG")


@dataclass(frozen=True)
class InputSpec:
    """What the served model takes: passed as validation context."""

    shape: tuple[int, ...]
    max_batch: int = 256
    max_image_pixels: int = 4096 * 4096
    input_range: tuple[float, float] = (0.0, 1.0)
    max_image_bytes: int = 4096 * 4096 * 4  # decoded: width x height x channels x bytes per channel

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def image_mode(self) -> str | None:
        """PIL mode images are converted to, or None for a model that does not take images."""
        if len(self.shape) != 3:
            return None
        return {1: "L", 3: "RGB"}.get(self.shape[0])

    def expected(self) -> str:
        shape = list(self.shape)
        if len(shape) == 1:
            return f"an array of {self.size} numbers"
        also = f" (or {shape[1:]})" if len(shape) == 3 and shape[0] == 1 else ""
        return f"{self.size} numbers or an array shaped {shape}{also}"

    def fit(self, array: np.ndarray) -> np.ndarray:
        """``array`` reshaped to the model input, or a ``shape`` error."""
        if array.shape == self.shape:
            return array
        if array.ndim == 1 and array.size == self.size:
            return array.reshape(self.shape)
        if len(self.shape) == 3 and self.shape[0] == 1 and array.shape == self.shape[1:]:
            return array[None]
        raise PydanticCustomError(
            "shape", "expected {expected}, got shape {got}", {"expected": self.expected(), "got": list(array.shape)}
        )


def _spec(info: ValidationInfo) -> InputSpec | None:
    return info.context.get("input") if isinstance(info.context, dict) else None


class Cancelled(Exception):
    """Decoding stopped because the request gave up (timed out or went away): nobody needs the result."""


def _check_stop(stop: Any) -> None:
    """Raise :class:`Cancelled` once ``stop`` (a ``threading.Event``, or None) is set."""
    if stop is not None and stop.is_set():
        raise Cancelled("the request gave up; decoding stopped")


def decoded_bytes(image: Any) -> int:
    """Bytes an opened PIL image decodes to, from its header alone: width x height x channels x bytes per
    channel as stored in the file (a 16-bit PNG counts 2 bytes per channel, although PIL keeps 8 bits of
    some of them)."""
    from PIL import ImageMode

    bands = len(image.getbands())
    depth = np.dtype(ImageMode.getmode(image.mode).typestr).itemsize
    for tile in image.tile or ():
        args = tile[3] if len(tile) > 3 else None
        rawmode = args if isinstance(args, str) else (args[0] if isinstance(args, tuple) and args else "")
        if isinstance(rawmode, str) and ";16" in rawmode:
            depth = max(depth, 2)
        elif isinstance(rawmode, str) and ";32" in rawmode:
            depth = max(depth, 4)
    return image.width * image.height * bands * depth


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, dict):
        return "an object"
    return "an array"


def _first_leaf_problem(value: Any) -> str:
    """Name the first JSON value that is not a number, or report ragged nesting."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        elif isinstance(item, bool) or not isinstance(item, (int, float)):
            return f"expected numbers, found {_json_type(item)}"
    return "expected nested arrays of numbers with equal lengths at each level"


def numeric_array(value: Any) -> np.ndarray:
    """A JSON array of numbers (nested to any depth) as float32, or an error saying what is wrong."""
    if not isinstance(value, list):
        raise PydanticCustomError("array_type", "expected an array of numbers, got {got}", {"got": _json_type(value)})
    try:
        array = np.asarray(value)
    except (ValueError, TypeError):  # numpy refuses ragged nesting
        raise PydanticCustomError("array_type", _first_leaf_problem(value)) from None
    if array.dtype.kind not in "iuf":
        raise PydanticCustomError("array_type", _first_leaf_problem(value))
    if array.size == 0:
        raise PydanticCustomError("array_empty", "expected numbers, got an empty array")
    leaves: Any = value
    for _ in range(array.ndim - 1):
        leaves = itertools.chain.from_iterable(leaves)
    if bool in set(map(type, leaves)):  # numpy silently turns [1.5, true] into [1.5, 1.0]
        raise PydanticCustomError("array_type", "expected numbers, found a boolean")
    with np.errstate(over="ignore"):
        array = array.astype(np.float32)
    if not np.isfinite(array).all():
        first = np.unravel_index(int(np.argmin(np.isfinite(array))), array.shape)
        raise PydanticCustomError(
            "finite_number", "expected finite numbers, found {value} at index {index}",
            {"value": str(array[first]), "index": [int(i) for i in first]},
        )
    return array


def decode_image(data: bytes, spec: InputSpec) -> np.ndarray:
    """PNG/JPEG bytes -> float array shaped like the model input, in the model's input range.

    Grayscale or RGB per the model's channels, resized to its H x W (PIL's default filter, as for
    training on image folders), pixels scaled from [0, 255] to the input range.
    """
    from PIL import Image, UnidentifiedImageError

    mode = spec.image_mode
    if mode is None:
        raise PydanticCustomError(
            "image_unsupported", "this model takes {expected}, not images", {"expected": spec.expected()}
        )
    channels, height, width = spec.shape
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                if image.format not in IMAGE_FORMATS:
                    raise PydanticCustomError(
                        "image_format", "expected a PNG or JPEG image, got {got}", {"got": image.format or "unknown"}
                    )
                pixels_in = image.width * image.height
                if pixels_in > spec.max_image_pixels:
                    raise PydanticCustomError(
                        "image_too_large", "image has {got} pixels, at most {limit} are accepted "
                        "(NOISEWISE_MAX_IMAGE_PIXELS)", {"got": pixels_in, "limit": spec.max_image_pixels},
                    )
                # what decoding costs is the decoded size: a small PNG of a large 16-bit image decodes to
                # hundreds of MB although its pixel count passes
                size = decoded_bytes(image)
                if size > spec.max_image_bytes:
                    raise PydanticCustomError(
                        "image_too_large", "image decodes to {got} bytes ({width} x {height} x {channels} channels "
                        "x {depth} bytes), at most {limit} are accepted (NOISEWISE_MAX_IMAGE_BYTES)",
                        {"got": size, "width": image.width, "height": image.height,
                         "channels": len(image.getbands()), "depth": size // max(1, pixels_in * len(image.getbands())),
                         "limit": spec.max_image_bytes},
                    )
                if image.format == "JPEG":
                    image.draft(mode, (width, height))  # let the JPEG decoder downscale large photos cheaply
                image = image.convert(mode)
                if image.size != (width, height):
                    image = image.resize((width, height))
                pixels = np.asarray(image, dtype=np.float32)
    except PydanticCustomError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        # PIL refuses, from the header alone, images over its own limit (Image.MAX_IMAGE_PIXELS, ~89M pixels)
        # before our check can run: the same answer as ours, with the smaller of the two limits
        found = re.search(r"\((\d+) pixels\)", str(err))
        raise PydanticCustomError(
            "image_too_large", "image has {got} pixels, at most {limit} are accepted (NOISEWISE_MAX_IMAGE_PIXELS)",
            {"got": int(found.group(1)) if found else "too many",
             "limit": min(spec.max_image_pixels, Image.MAX_IMAGE_PIXELS or spec.max_image_pixels)},
        ) from None
    except UnidentifiedImageError:
        raise PydanticCustomError("image_decode", "cannot decode: not a PNG or JPEG image") from None
    except (OSError, ValueError, SyntaxError) as err:
        raise PydanticCustomError(
            "image_decode", "cannot decode the image ({reason})", {"reason": str(err) or type(err).__name__}
        ) from None
    pixels = pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)
    low, high = spec.input_range
    return (low + pixels * ((high - low) / 255.0)).astype(np.float32)


def has_json_booleans(body: str | bytes | bytearray) -> bool:
    """Whether a JSON text may hold a ``true`` or ``false`` (a C-speed scan of the raw body). False proves the
    parsed value has no boolean, so that :func:`inputs_batch` can skip its per-number scan for one."""
    true, false = ("true", "false") if isinstance(body, str) else (b"true", b"false")
    return true in body or false in body


#: float32 values from this magnitude up may come from integers that float64 cannot hold exactly: converted
#: per item they would round once, as one float64 batch twice; such a batch goes item by item
_EXACT_INTEGERS = 2.0**53


def inputs_batch(items: Any, spec: InputSpec, booleans: bool = True) -> np.ndarray | None:
    """``items`` (the ``inputs`` of a request) as one float32 batch ``[N, *spec.shape]`` in one numpy pass, or
    None when anything is off: a wrong count, shape or type, a boolean, a number that is not finite in float32.

    The batch equals what the item-by-item validation gives (same values, same dtype); None sends the request
    there, which names the exact item and problem. ``booleans=False`` says the caller has proved there is no
    JSON boolean in the body (:func:`has_json_booleans`): numpy turns ``[1.5, true]`` into ``[1.5, 1.0]``
    silently, so otherwise every number's type is checked (a C-level scan, still cheaper than one per item).
    """
    if not isinstance(items, list) or not 0 < len(items) <= spec.max_batch:
        return None
    try:
        array = np.asarray(items)
    except (ValueError, TypeError):  # ragged nesting
        return None
    if array.dtype.kind not in "iuf" or array.ndim < 2:
        return None
    rest = array.shape[1:]
    if rest == spec.shape:
        pass
    elif rest == (spec.size,):
        array = array.reshape(len(items), *spec.shape)
    elif len(spec.shape) == 3 and spec.shape[0] == 1 and rest == spec.shape[1:]:
        array = array[:, None]
    else:
        return None
    if booleans:
        leaves: Any = items
        for _ in range(len(rest)):
            leaves = itertools.chain.from_iterable(leaves)
        if bool in set(map(type, leaves)):
            return None
    with np.errstate(over="ignore"):
        batch = array.astype(np.float32)
    if not np.isfinite(batch).all():
        return None
    if array.dtype.kind == "f" and float(np.abs(batch).max()) >= _EXACT_INTEGERS:
        return None
    return batch


def _input_item(value: Any, info: ValidationInfo) -> np.ndarray:
    array = numeric_array(value)
    spec = _spec(info)
    return spec.fit(array) if spec is not None else array


def _image_item(value: Any, info: ValidationInfo) -> bytes | np.ndarray:
    if not isinstance(value, str):
        raise PydanticCustomError(
            "image_type", "expected a base64-encoded PNG or JPEG string, got {got}", {"got": _json_type(value)}
        )
    text = value.strip()
    if text.startswith("data:"):  # a data URL: data:image/png;base64,....
        text = text.partition(",")[2]
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise PydanticCustomError("image_base64", "not valid base64 (expected a base64-encoded PNG or JPEG)") from None
    if not data:
        raise PydanticCustomError("image_base64", "empty image")
    spec = _spec(info)
    if spec is None:
        return data
    _check_stop(info.context.get("stop"))
    return decode_image(data, spec)


_NUMBERS_SCHEMA = {
    "type": "array",
    "description": "One input: nested arrays of numbers shaped like the model input (`input.shape` of "
    "`/model`, e.g. [1, 8, 8]; [8, 8] is accepted for one channel), or a flat array of prod(shape) numbers. "
    "Finite numbers only.",
    "items": {"anyOf": [{"type": "number"}, {"type": "array", "items": {}}]},
    "minItems": 1,
}
InputArray = Annotated[Any, AfterValidator(_input_item), WithJsonSchema(_NUMBERS_SCHEMA)]
Base64Image = Annotated[
    Any, AfterValidator(_image_item),
    WithJsonSchema({"type": "string", "format": "byte", "description": "a base64-encoded PNG or JPEG image "
                    "(a data: URL is accepted too)"}),
]


class PredictRequest(BaseModel):
    """Either ``inputs`` or ``images``, one prediction per item."""

    model_config = ConfigDict(extra="forbid")

    inputs: list[InputArray] | None = Field(
        None, description="a batch of inputs, each shaped like the model input or flat (at most NOISEWISE_MAX_BATCH, "
        "default 256)",
    )
    images: list[Base64Image] | None = Field(
        None, description="a batch of base64-encoded PNG/JPEG images, converted to the model input (grayscale or "
        "RGB, resized to H x W, pixels scaled to [0, 1]); at most NOISEWISE_MAX_BATCH",
    )
    explain: StrictBool = Field(
        False, description="true: the response carries the full guarantees block (conditions, thresholds, "
        "assumptions) instead of the short form",
    )
    _batch: np.ndarray | None = PrivateAttr(None)

    @field_validator("inputs", mode="wrap")
    @classmethod
    def inputs_at_once(cls, value: Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo) -> Any:
        """A valid batch in one numpy pass (:func:`inputs_batch`); item by item only when that fails, to name
        the problem. Context ``"booleans": False``: the body has no JSON boolean (:func:`has_json_booleans`)."""
        spec = _spec(info)
        if spec is not None:
            batch = inputs_batch(value, spec, booleans=info.context.get("booleans", True))
            if batch is not None:
                return list(batch)
        return handler(value)

    @field_validator("inputs", "images", mode="before")
    @classmethod
    def check_count(cls, value: Any, info: ValidationInfo) -> Any:
        """Before the items are converted, so that an oversized batch costs nothing."""
        if isinstance(value, list):
            if not value:
                raise PydanticCustomError("empty_batch", "empty batch: expected at least 1 item")
            spec = _spec(info)
            if spec is not None and len(value) > spec.max_batch:
                raise PydanticCustomError(
                    "batch_too_large", "{got} items, at most {limit} are accepted per request (NOISEWISE_MAX_BATCH)",
                    {"got": len(value), "limit": spec.max_batch},
                )
        return value

    @model_validator(mode="after")
    def check_one_source(self, info: ValidationInfo) -> PredictRequest:
        if self.inputs is None and self.images is None:
            raise PydanticCustomError(
                "missing", "expected 'inputs' (arrays of numbers) or 'images' (base64 PNG/JPEG strings)"
            )
        if self.inputs is not None and self.images is not None:
            raise PydanticCustomError("conflict", "expected either 'inputs' or 'images' in one request, not both")
        if _spec(info) is not None:
            self._batch = np.stack(self.inputs if self.inputs is not None else self.images)
        return self

    @property
    def batch(self) -> np.ndarray:
        """The validated float32 batch ``[N, *input_shape]`` (only after validation with an InputSpec)."""
        if self._batch is None:
            raise RuntimeError("PredictRequest was validated without an InputSpec context")
        return self._batch


class ImageUpload(BaseModel):
    """``multipart/form-data`` with one or more files in the field ``images``."""

    model_config = ConfigDict(extra="forbid")

    images: list[pathlib.Path] = Field(
        description="PNG/JPEG files (repeat the field for a batch); converted like `images` of /predict",
    )
    explain: bool = Field(False, description="true: the full guarantees block, as `explain` of /predict")


def images_batch(files: list[bytes], spec: InputSpec, stop: Any = None) -> np.ndarray:
    """Uploaded image files -> ``[N, *input_shape]``; errors located at ``images[i]``. ``stop`` (a
    ``threading.Event``): once set, :class:`Cancelled` before the next image."""
    errors: list[dict] = []
    arrays = []
    if len(files) > spec.max_batch:
        errors.append({"type": PydanticCustomError(
            "batch_too_large", "{got} items, at most {limit} are accepted per request (NOISEWISE_MAX_BATCH)",
            {"got": len(files), "limit": spec.max_batch}), "loc": ("images",), "input": None})
    elif not files:
        errors.append({"type": PydanticCustomError("empty_batch", "empty batch: expected at least 1 item"),
                       "loc": ("images",), "input": None})
    for i, data in enumerate(files if not errors else []):
        _check_stop(stop)
        try:
            arrays.append(decode_image(data, spec))
        except PydanticCustomError as err:
            errors.append({"type": err, "loc": ("images", i), "input": None})
    if errors:
        raise ValidationError.from_exception_data("ImageUpload", errors)
    return np.stack(arrays)


# --- error responses ------------------------------------------------------------------------------
class ErrorDetail(BaseModel):
    loc: list[str | int] = Field(description="where the problem is, e.g. ['inputs', 3]")
    msg: str
    type: str


class ErrorResponse(BaseModel):
    """Body of every 4xx answer from noisewise's own validation."""

    error: str = Field(description="the problems in one line, e.g. 'inputs[3]: expected 64 numbers or an array "
                       "shaped [1, 8, 8], got shape [5]'")
    detail: list[ErrorDetail]


_FRIENDLY = {
    "extra_forbidden": "unknown field: a request has 'inputs' (arrays of numbers) or 'images' (base64 PNG/JPEG), "
                       "and optionally 'explain'",
    "model_type": "expected a JSON object with 'inputs' or 'images'",
    "model_attributes_type": "expected a JSON object with 'inputs' or 'images'",
    "list_type": "expected an array",
    "bool_type": "expected true or false",
}


def location(loc: tuple | list) -> str:
    """``('inputs', 3, 'x')`` -> ``inputs[3].x``; ``()`` -> ``body``."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "body"


#: Validation errors that are a size limit being exceeded: answered with 413, not 400.
SIZE_ERRORS = frozenset({"batch_too_large", "image_too_large"})


def error_status(err: ValidationError) -> int:
    """413 when every problem is a size limit (NOISEWISE_MAX_BATCH, NOISEWISE_MAX_IMAGE_PIXELS,
    NOISEWISE_MAX_IMAGE_BYTES), else 400
    (a request with other problems too is a bad request first; each problem keeps its ``type``)."""
    types = {e["type"] for e in err.errors(include_url=False, include_context=False, include_input=False)}
    return 413 if types and types <= SIZE_ERRORS else 400


def error_response(err: ValidationError, limit: int = 5) -> ErrorResponse:
    details = [
        ErrorDetail(loc=list(e["loc"]), msg=_FRIENDLY.get(e["type"], e["msg"]), type=e["type"])
        for e in err.errors(include_url=False, include_context=False, include_input=False)
    ]
    parts = [f"{location(d.loc)}: {d.msg}" for d in details[:limit]]
    if len(details) > limit:
        parts.append(f"... and {len(details) - limit} more")
    return ErrorResponse(error="; ".join(parts), detail=details)


# --- responses ------------------------------------------------------------------------------------
#: Decimals of probabilities and scores in responses (serialization only: the values computed are not changed).
DECIMALS = 4


def round_decimals(value: float | None, decimals: int = DECIMALS) -> float | None:
    """``value`` rounded to ``decimals`` decimals; None stays None."""
    return None if value is None else round(float(value), decimals)


def round_readable(value: float | None, digits: int = DECIMALS) -> float | None:
    """``value`` rounded to the more precise of ``digits`` decimals and ``digits`` significant digits (0.2222,
    450.1234, and a p-value of 0.00012345 stays 0.0001234 rather than 0.0001). None, NaN, infinities pass as
    they are."""
    if value is None or not math.isfinite(value) or value == 0:
        return value
    magnitude = math.floor(math.log10(abs(value)))
    return round(float(value), max(digits, digits - 1 - magnitude))


def round_floats(value: Any, digits: int = DECIMALS) -> Any:
    """Every float in a JSON-like value through :func:`round_readable`, recursively (booleans and integers kept)."""
    if isinstance(value, float):
        return round_readable(value, digits)
    if isinstance(value, dict):
        return {k: round_floats(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [round_floats(v, digits) for v in value]
    return value


class RoundedModel(BaseModel):
    """A response part whose floats (declared or extra) are rounded by :func:`round_floats` in JSON only:
    ``model_dump()`` keeps full precision for the code that reads it (metrics, the store)."""

    @model_serializer(mode="wrap")
    def _rounded(self, handler: SerializerFunctionWrapHandler, info: SerializationInfo):  # no return type: keeps
        # the model's own JSON schema
        data = handler(self)
        return round_floats(data) if info.mode_is_json() else data


class TopK(BaseModel):
    label: int
    class_name: str
    probability: float = Field(description="softmax probability of the class (4 decimals)")

    @field_serializer("probability", when_used="json")
    def _round(self, value: float) -> float:
        return round_decimals(value)


class OODResult(BaseModel):
    score: float = Field(description="OOD score of the calibration's scorer (higher = more out-of-distribution; "
                         "4 decimals)")
    p_value: float = Field(description="conformal p-value against in-distribution calibration scores (the more "
                           "precise of 4 decimals and 4 significant digits)")
    is_ood: bool = Field(description="p_value <= alpha_ood")

    @field_serializer("score", when_used="json")
    def _round_score(self, value: float) -> float:
        return round_decimals(value)

    @field_serializer("p_value", when_used="json")
    def _round_p(self, value: float) -> float:
        return round_readable(value)


class ModelRef(BaseModel):
    name: str
    version: str


#: ``set_reason`` of an empty prediction set.
SET_REASONS = ("ood", "no_class_passes")


def empty_set_reason(prediction_set: list, is_ood: bool) -> str | None:
    """Why a prediction set is empty: ``"ood"`` when the input is also flagged out-of-distribution, else
    ``"no_class_passes"``; None for a set that is not empty."""
    if prediction_set:
        return None
    return "ood" if is_ood else "no_class_passes"


class Prediction(BaseModel):
    id: str = Field(description="UUID4 of this prediction (use it to send feedback)")
    label: int = Field(description="index of the most probable class")
    class_name: str
    score: float = Field(
        description="selective score of the abstention rule: the calibration's confidence function "
        "(MaxLogit-pNorm, or MSP for some calibrations; /model calibration.abstention.confidence says which). "
        "Higher = more confident. Not a probability: compare it with `threshold` only (4 decimals; the decision "
        "uses the unrounded values)")
    threshold: float | None = Field(
        description="certified threshold on `score`: a prediction not flagged OOD is accepted when score >= "
        "threshold; null when nothing could be certified (every prediction abstains). 4 decimals")
    top_k: list[TopK]
    prediction_set: list[str] = Field(
        description="conformal prediction set (noise-aware), class names; it covers the true label at the "
        "target coverage. Empty when no class passes the set threshold: see `set_reason`")
    set_reason: Literal["ood", "no_class_passes"] | None = Field(
        None, description="why `prediction_set` is empty (null when it is not): `ood`: the input is also flagged "
        "out-of-distribution, no class fits it; `no_class_passes`: no class is plausible enough (an ambiguous "
        "input, or one unlike the calibration data that the OOD gate did not flag). Treat the label as unknown: "
        "do not act on it, route the input to a person")
    ood: OODResult
    decision: Literal["accept", "abstain"]
    reason: Literal["ood", "low_confidence"] | None = Field(
        description="why the prediction abstains: `ood` (the OOD gate comes first), then `low_confidence` "
        "(score below threshold)"
    )
    model: ModelRef

    @field_serializer("score", "threshold", when_used="json")
    def _round(self, value: float | None) -> float | None:
        return round_decimals(value)


def _kind() -> Any:
    return Field("none", description="valid: its assumption is removed by trusted labels or known by construction; "
                 "conservative: valid under the stated condition, which nothing checked; none: nothing is promised")


class SetGuarantee(RoundedModel):
    model_config = ConfigDict(extra="allow")

    kind: Literal["valid", "conservative", "none"] = _kind()
    condition: str = Field("", description="what the guarantee rests on, in plain words")
    target_coverage: float = Field(description="1 - alpha")
    alpha: float
    method: str = Field(description="how the set threshold was calibrated: split (observed labels), "
                        "split_conditional, nacp, nacp_delta, audit_rectified, audit_rectified_conditional")
    score: str = Field(description="conformity score (lac, aps, raps)")
    eps: float | None = Field(None, description="label-noise rate plugged in (uniform convention)")
    delta: float | None = Field(None, description="failure probability of the finite-sample guarantee")
    Delta: float | None = Field(None, description="finite-sample margin added to the coverage target")
    n: int | None = Field(None, description="calibration items")
    full_sets: bool | None = None


class AbstentionGuarantee(RoundedModel):
    model_config = ConfigDict(extra="allow")

    kind: Literal["valid", "conservative", "none"] = _kind()
    condition: str = Field("", description="what the guarantee rests on, in plain words")
    can_certify: str | None = Field(None, description="what the certified risk-coverage frontier allows, in "
                                    "words (the full frontier is on /model)")
    risk_target: float = Field(description="r*: certified bound on the error rate of accepted predictions")
    delta: float = Field(description="failure probability of the certificate")
    certified: bool = Field(description="false: no threshold could be certified, every prediction abstains")
    risk_ucb: float | None = Field(None, description="upper confidence bound on the selective risk")
    coverage: float | None = Field(None, description="fraction of calibration inputs accepted")
    confidence: str | None = Field(None, description="confidence function that gives each prediction's `score` "
                                   "(maxlogit_pnorm or msp)")
    noise_correction_eps: float | None = None


class OODGuarantee(RoundedModel):
    model_config = ConfigDict(extra="allow")

    kind: Literal["valid", "conservative", "none"] = _kind()
    condition: str = Field("", description="what the guarantee rests on, in plain words")
    scorer: str
    alpha_ood: float = Field(description="bound on the rate of in-distribution inputs flagged OOD")
    n_calibration: int | None = None


class Guarantees(BaseModel):
    """What the prediction sets, the abstention and the OOD flag guarantee, and under which assumptions (the
    full block: on /model as `calibration`, and on a prediction response sent with `"explain": true`)."""

    prediction_set: SetGuarantee
    abstention: AbstentionGuarantee
    ood: OODGuarantee
    assumptions: list[str]

    def summary(self) -> GuaranteesSummary:
        """The short form sent with every prediction response by default."""
        return GuaranteesSummary(
            prediction_set=SetSummary(kind=self.prediction_set.kind,
                                      target_coverage=self.prediction_set.target_coverage),
            abstention=AbstentionSummary(kind=self.abstention.kind, risk_target=self.abstention.risk_target,
                                         certified=self.abstention.certified),
            ood=OODSummary(kind=self.ood.kind, alpha_ood=self.ood.alpha_ood),
        )


class SetSummary(RoundedModel):
    kind: Literal["valid", "conservative", "none"] = _kind()
    target_coverage: float = Field(description="1 - alpha: the share of true labels the sets cover")


class AbstentionSummary(RoundedModel):
    kind: Literal["valid", "conservative", "none"] = _kind()
    risk_target: float = Field(description="r*: certified bound on the error rate of accepted predictions")
    certified: bool = Field(description="false: no threshold could be certified, every prediction abstains")


class OODSummary(RoundedModel):
    kind: Literal["valid", "conservative", "none"] = _kind()
    alpha_ood: float = Field(description="bound on the rate of in-distribution inputs flagged OOD")


#: Where a client finds the full guarantees block (conditions, thresholds, assumptions).
GUARANTEES_DETAIL = 'GET /model (calibration), or send "explain": true'


class GuaranteesSummary(BaseModel):
    """Each guarantee's kind and target, in short: the default on prediction responses. The conditions,
    thresholds and assumptions are on /model (`calibration`) and in the response to a request with
    `"explain": true`."""

    prediction_set: SetSummary
    abstention: AbstentionSummary
    ood: OODSummary
    detail: str = Field(GUARANTEES_DETAIL, description="where the full block is")


class PredictResponse(BaseModel):
    predictions: list[Prediction]
    guarantees: GuaranteesSummary | Guarantees = Field(
        description="what the sets, the abstention and the OOD flag guarantee: the short form by default, the "
        "full block (conditions, thresholds, assumptions) with `\"explain\": true`")


def predict_response_json(predictions: list[Prediction], guarantees: GuaranteesSummary | Guarantees) -> bytes:
    """The JSON body of a :class:`PredictResponse`, built without validation: the predictions are the service's
    own (``Prediction.model_construct``), so only pydantic's serializers run."""
    return PredictResponse.model_construct(predictions=predictions, guarantees=guarantees).model_dump_json().encode()


class InputInfo(BaseModel):
    shape: list[int] = Field(description="one input, without the batch dimension")
    size: int = Field(description="numbers in one input (length of a flat vector)")
    dtype: str = "float32"
    range: list[float] = Field(description="value range the model was trained on; images are scaled to it")
    images: bool = Field(description="whether PNG/JPEG images are accepted")
    image_mode: str | None = Field(None, description="L (grayscale) or RGB")
    preprocess: dict[str, Any] | None = Field(
        None, description="imported models: how an input of `shape` becomes what the network takes, applied by the "
        "version to arrays and decoded images alike (network input_shape; resize: shorter side before a center crop, "
        "null = straight to H x W; mean/std per channel, null = none); null for noisewise's own networks")


class ServingInfo(BaseModel):
    device: str
    batching: bool
    batch_max_size: int
    batch_max_latency_ms: int
    max_inputs_per_request: int
    top_k: int


class CalibrationSummary(RoundedModel):
    """The full guarantees block with the certified risk-coverage frontier and the noise record."""

    model_config = ConfigDict(extra="allow")

    prediction_set: dict[str, Any]
    abstention: dict[str, Any]
    ood: dict[str, Any]
    noise: dict[str, Any]
    assumptions: list[str]


class ModelInfo(BaseModel):
    name: str
    version: str
    alias: str | None = Field(description="alias the service was started with (None for NAME/VERSION)")
    uri: str | None = None
    run_id: str | None = None
    arch: str
    classes: list[str]
    input: InputInfo
    calibration: CalibrationSummary
    serving: ServingInfo


def finite_or_none(value: Any) -> Any:
    """NaN/inf -> None, recursively: JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def guarantees_from(summary: dict[str, Any]) -> Guarantees:
    summary = finite_or_none(summary)
    return Guarantees(
        prediction_set=SetGuarantee(**summary["prediction_set"]),
        # the frontier table stays on /model: the full block carries only its one-line reading
        abstention=AbstentionGuarantee(**{k: v for k, v in summary["abstention"].items() if k != "frontier"}),
        ood=OODGuarantee(**summary["ood"]),
        assumptions=list(summary.get("assumptions") or []),
    )
