"""``POST /feedback`` and ``POST /suspects``: request models and the per-item ingestion.

A feedback batch is validated item by item: a malformed item, an unknown label or an unknown prediction id
is rejected with its own status and message, and the other items are still stored. Each item's ``status``
is HTTP-like: 201 stored, 200 duplicate (already stored: not counted twice), 400 malformed, 404 unknown
prediction id, 409 conflict (this annotator already gave another label for this prediction), 422 unknown
label. The response status is 200 when every item was stored or was a duplicate, 207 when some were
rejected and some not, and the items' common 4xx (or 400) when all were rejected.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from noisewise.services.schemas import location

MAX_LABEL_CHARS = 256
MAX_ANNOTATOR_CHARS = 128


class FeedbackItem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prediction_id: str = Field(min_length=1, max_length=64, description="the `id` of a served prediction")
    label: StrictInt | str = Field(description="the true label: a class name or a class index")
    annotator: str | None = Field(None, max_length=MAX_ANNOTATOR_CHARS,
                                  description="who labelled it; several annotators per prediction are kept")
    audited: StrictBool = Field(False, description="a trusted (audited) label: used for the noise-rate estimate "
                                "and the audit-rectified recalibration")

    @field_validator("label", mode="before")
    @classmethod
    def check_label_length(cls, value: Any) -> Any:
        """A class name is short: a longer string is refused as too long, not looked up as an unknown label."""
        if isinstance(value, str) and len(value) > MAX_LABEL_CHARS:
            raise PydanticCustomError("string_too_long", "a label of {got} characters, at most {limit} are accepted",
                                      {"got": len(value), "limit": MAX_LABEL_CHARS})
        return value


class FeedbackRequest(BaseModel):
    """``{"items": [{"prediction_id": ..., "label": ..., "annotator"?: ..., "audited"?: ...}, ...]}``"""

    items: list[FeedbackItem] = Field(min_length=1, description="feedback items (at most NOISEWISE_MAX_FEEDBACK_ITEMS)")


class FeedbackItemResult(BaseModel):
    index: int = Field(description="position of the item in the request")
    prediction_id: str | None = None
    status: int = Field(description="201 stored, 200 duplicate, 400 malformed, 404 unknown prediction, "
                        "409 conflict, 422 unknown label")
    outcome: Literal["stored", "duplicate", "rejected"]
    error: str | None = Field(None, description="why the item was rejected")
    label: str | None = Field(None, description="the label, as a class name")
    suspect: bool | None = Field(None, description="the label looks like an annotation error (confident learning)")
    quality: float | None = Field(None, description="label quality: the model's probability of the label")
    proposed: str | None = Field(None, description="the model's proposed label")
    is_ood: bool | None = Field(None, description="the input was flagged OOD: the model cannot judge its label")


class FeedbackResponse(BaseModel):
    stored: int
    duplicates: int
    rejected: int
    items: list[FeedbackItemResult]


class SuspectsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    since: datetime | None = Field(None, description="only feedback received at or after this time (ISO 8601)")
    class_name: str | None = Field(None, max_length=MAX_LABEL_CHARS, description="only labels of this class")
    limit: int = Field(100, ge=1, le=10_000, description="most suspects listed")


def resolve_label(label: int | str, class_names: Sequence[str]) -> int | None:
    """Class index of ``label`` (a class name, or an index), or None."""
    if isinstance(label, int):
        return label if 0 <= label < len(class_names) else None
    try:
        return list(class_names).index(label)
    except ValueError:
        return None


def _label_error(label: Any, class_names: Sequence[str]) -> str:
    names = ", ".join(repr(n) for n in class_names[:20]) + (", ..." if len(class_names) > 20 else "")
    shown = repr(label) if not isinstance(label, str) or len(label) <= 40 else repr(label[:40] + "...")
    return f"unknown label {shown}: expected a class name ({names}) or an index in [0, {len(class_names)})"


def ingest(raw_items: list, store, class_names: Sequence[str], thresholds: np.ndarray) -> tuple[FeedbackResponse, list[dict]]:
    """Validate, score and store a feedback batch (blocking: call it from a worker thread).

    Returns the response and, for the metrics, one dict per newly stored item (label, predicted, suspect,
    is_ood)."""
    from noisewise.monitoring.feedback import score_feedback
    from noisewise.monitoring.store import FeedbackRow

    results: list[FeedbackItemResult | None] = [None] * len(raw_items)
    valid: list[tuple[int, FeedbackItem, int]] = []
    for i, raw in enumerate(raw_items):
        try:
            item = FeedbackItem.model_validate(raw)
        except ValidationError as err:
            first = err.errors(include_url=False)[0]
            results[i] = FeedbackItemResult(
                index=i, prediction_id=raw.get("prediction_id") if isinstance(raw, dict) and isinstance(
                    raw.get("prediction_id"), str) and len(raw["prediction_id"]) <= 64 else None,
                status=400, outcome="rejected",
                error=f"{location(('items', i, *first['loc']))}: {_friendly(first)}")
            continue
        label = resolve_label(item.label, class_names)
        if label is None:
            results[i] = FeedbackItemResult(index=i, prediction_id=item.prediction_id, status=422, outcome="rejected",
                                            error=f"items[{i}].label: {_label_error(item.label, class_names)}")
            continue
        valid.append((i, item, label))

    found = store.get_predictions([item.prediction_id for _, item, _ in valid]) if valid else {}
    k = len(class_names)
    scorable = []
    for i, item, label in valid:
        stored = found.get(item.prediction_id)
        if stored is None:
            results[i] = FeedbackItemResult(index=i, prediction_id=item.prediction_id, status=404, outcome="rejected",
                                            error=f"items[{i}].prediction_id: no stored prediction has id "
                                                  f"{item.prediction_id!r}")
        elif len(stored.probs) != k:
            results[i] = FeedbackItemResult(
                index=i, prediction_id=item.prediction_id, status=422, outcome="rejected",
                error=f"items[{i}].prediction_id: made by {stored.model_name}/{stored.model_version} with "
                      f"{len(stored.probs)} classes; the served model has {k}")
        else:
            scorable.append((i, item, label, stored))

    new_items: list[dict] = []
    if scorable:
        probs = np.stack([s.probs for *_, s in scorable]).astype(np.float32)
        labels = np.array([label for _, _, label, _ in scorable], dtype=np.int64)
        scores = score_feedback(probs, labels, np.asarray(thresholds, dtype=np.float32))
        rows = [
            FeedbackRow(prediction_id=item.prediction_id, label=label, annotator=item.annotator or "",
                        audited=item.audited, quality=float(scores.quality[j]), suspect=bool(scores.suspect[j]),
                        proposed=int(scores.proposed[j]), in_set=label in stored.prediction_set)
            for j, (_, item, label, stored) in enumerate(scorable)
        ]
        outcomes = store.add_feedback(rows)
        for j, ((i, item, label, stored), outcome) in enumerate(zip(scorable, outcomes)):
            common = dict(index=i, prediction_id=item.prediction_id, label=class_names[label],
                          suspect=bool(scores.suspect[j]) and not stored.is_ood, quality=float(scores.quality[j]),
                          proposed=class_names[int(scores.proposed[j])], is_ood=stored.is_ood)
            if outcome == "conflict":
                results[i] = FeedbackItemResult(
                    **common, status=409, outcome="rejected",
                    error=f"items[{i}]: annotator {item.annotator or ''!r} already labelled this prediction "
                          "differently; the first label stands (send a second opinion under another annotator)")
            else:
                results[i] = FeedbackItemResult(**common, status=201 if outcome == "stored" else 200, outcome=outcome)
                if outcome == "stored":
                    new_items.append({"label": label, "predicted": stored.predicted,
                                      "suspect": bool(scores.suspect[j]), "is_ood": stored.is_ood})
    items = [r for r in results if r is not None]
    response = FeedbackResponse(
        stored=sum(r.outcome == "stored" for r in items), duplicates=sum(r.outcome == "duplicate" for r in items),
        rejected=sum(r.outcome == "rejected" for r in items), items=items)
    return response, new_items


def response_status(response: FeedbackResponse) -> int:
    if not response.rejected:
        return 200
    if response.rejected < len(response.items):
        return 207
    statuses = {r.status for r in response.items}
    return statuses.pop() if len(statuses) == 1 else 400


def _friendly(error: dict) -> str:
    if error["type"] == "extra_forbidden":
        return "unknown field: an item has prediction_id, label, annotator and audited"
    if error["type"] == "missing":
        return "required"
    return error["msg"]
