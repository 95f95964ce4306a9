"""/predict's vectorized validation and directly written answers against the behaviour they replace.

The request cases below were run through the item-by-item validation before the vectorized path existed;
``GOLDEN`` holds what it answered (the batch's shape and SHA-256, or the 4xx status and the error body),
and every case must still get exactly that. The answer is compared byte for byte with the pydantic
rendering it replaces (``Prediction`` models in a ``PredictResponse``, serialized as BentoML did).
"""

from __future__ import annotations

import hashlib
import json
import math
import types
import uuid

import numpy as np
import pytest
from pydantic import ValidationError

from noisewise.models.predictor import Prediction as ModelOutput
from noisewise.services.schemas import (
    InputSpec,
    ModelRef,
    Prediction,
    PredictRequest,
    PredictResponse,
    empty_set_reason,
    error_response,
    error_status,
    guarantees_from,
    has_json_booleans,
    inputs_batch,
    predict_response_json,
)

S8, S32, S5 = (1, 8, 8), (3, 32, 32), (5,)


def build_cases() -> dict[str, tuple[tuple[int, ...], dict]]:
    """name -> (model input shape, request body). Deterministic: GOLDEN's hashes depend on the order of draws."""
    rng = np.random.default_rng(1)

    def arr(*shape):
        return np.round(rng.random(shape), 4).tolist()

    c = []
    c.append(("shaped", S8, {"inputs": [arr(1, 8, 8)]}))
    c.append(("shaped_batch3", S8, {"inputs": [arr(1, 8, 8) for _ in range(3)]}))
    c.append(("no_channel", S8, {"inputs": [arr(8, 8), arr(8, 8)]}))
    c.append(("flat", S8, {"inputs": [arr(64)]}))
    c.append(("mixed_forms", S8, {"inputs": [arr(64), arr(1, 8, 8), arr(8, 8)]}))
    c.append(("ints", S8, {"inputs": [[[list(range(8)) for _ in range(8)]]]}))
    c.append(("ints_and_floats", S8, {"inputs": [[[list(range(8)) for _ in range(8)]], arr(1, 8, 8)]}))
    c.append(("big_int_and_float", S5, {"inputs": [[2**53 + 1, 1, 2, 3, 4], [0.5, 1, 2, 3, 4]]}))
    c.append(("big_ints", S5, {"inputs": [[2**60 + 12345, 1, 2, 3, 4], [0.5, 1.5, 2, 3, 4]]}))
    c.append(("cifar", S32, {"inputs": [arr(3, 32, 32)]}))
    c.append(("cifar_batch2_flat", S32, {"inputs": [arr(3072), arr(3, 32, 32)]}))
    c.append(("vector", S5, {"inputs": [[1, 2, 3, 4, 5.5]]}))
    c.append(("explain", S8, {"inputs": [arr(64)], "explain": True}))
    bad = arr(1, 8, 8)
    bad[0][3][2] = float("nan")
    c.append(("nan", S8, {"inputs": [arr(1, 8, 8), arr(1, 8, 8), arr(1, 8, 8), bad]}))
    bad = arr(1, 8, 8)
    bad[0][1][5] = float("inf")
    c.append(("inf", S8, {"inputs": [bad]}))
    bad = arr(64)
    bad[10] = -float("inf")
    c.append(("neg_inf_flat", S8, {"inputs": [bad]}))
    bad = arr(1, 8, 8)
    bad[0][2][2] = "0.5"
    c.append(("string", S8, {"inputs": [bad]}))
    bad = arr(1, 8, 8)
    bad[0][2][2] = None
    c.append(("null_leaf", S8, {"inputs": [bad]}))
    bad = arr(1, 8, 8)
    bad[0][2][2] = {"a": 1}
    c.append(("object_leaf", S8, {"inputs": [bad]}))
    bad = arr(1, 8, 8)
    bad[0][4][1] = True
    c.append(("bool_leaf", S8, {"inputs": [arr(1, 8, 8), bad]}))
    c.append(("bool_all", S5, {"inputs": [[True, False, True, True, False]]}))
    c.append(("bool_mixed_ints", S5, {"inputs": [[1, 2, 3, 4, False]]}))
    c.append(("huge", S8, {"inputs": [[[[1e39] + [0.0] * 7] + [[0.0] * 8] * 7]]}))
    c.append(("huge_negative_flat", S8, {"inputs": [[0.0] * 63 + [-3.5e38]]}))
    c.append(("huge_int", S5, {"inputs": [[10**400, 1, 2, 3, 4]]}))
    c.append(("wrong_shape", S8, {"inputs": [arr(5)]}))
    c.append(("wrong_shape_2d", S8, {"inputs": [arr(4, 16)]}))
    c.append(("wrong_shape_many", S8, {"inputs": [arr(5), arr(1, 8, 8), arr(7), arr(2, 8, 8)]}))
    x = arr(1, 8, 8)
    x[0][3] = x[0][3][:7]
    c.append(("ragged", S8, {"inputs": [x]}))
    x = arr(1, 8, 8)
    x[0][3] = 0.5
    c.append(("ragged_scalar", S8, {"inputs": [x]}))
    c.append(("scalar_item", S8, {"inputs": [0.5, arr(64)]}))
    c.append(("string_item", S8, {"inputs": ["abc"]}))
    c.append(("empty_item", S8, {"inputs": [[]]}))
    c.append(("empty_nested", S8, {"inputs": [[[]]]}))
    c.append(("empty_batch", S8, {"inputs": []}))
    c.append(("too_many", S8, {"inputs": [arr(64)] * 257}))
    c.append(("not_a_list", S8, {"inputs": "abc"}))
    c.append(("inputs_null", S8, {"inputs": None}))
    c.append(("nothing", S8, {}))
    c.append(("both", S8, {"inputs": [arr(64)], "images": ["abc"]}))
    c.append(("extra_field", S8, {"inputs": [arr(64)], "foo": 1}))
    c.append(("explain_not_bool", S8, {"inputs": [arr(64)], "explain": "yes"}))
    c.append(("many_bad", S8, {"inputs": [[float("nan")] * 64, "x", arr(3), [True] * 64, arr(64), None, [[1, [2]]]]}))
    c.append(("nested_wrong_lengths", S32, {"inputs": [arr(3, 32, 31)]}))
    c.append(("cifar_nan", S32, {"inputs": [arr(3, 32, 32), arr(3072)]}))
    c[-1][2]["inputs"][1][3000] = float("nan")
    return {name: (shape, body) for name, shape, body in c}


CASES = build_cases()


#: What the item-by-item validation answered to CASES before the vectorized path (captured, not computed).
GOLDEN = {'shaped': ((1, 1, 8, 8), 'f8df4fca533dc2e74d66e7d23073148380964911be97e840a028db02181e7a63', False),
 'shaped_batch3': ((3, 1, 8, 8), '072231f219b99fd94e4a8fb91df5ac12a2968a62a869598819caad5d505186d5', False),
 'no_channel': ((2, 1, 8, 8), '9bcc0d1cb45efab773f53488e6f7519a209e3ccd04ee7598367a131c80c4f6c3', False),
 'flat': ((1, 1, 8, 8), '468f820a1b19322195f2517f80988c79c6a6b0c6b39867b6f51aa6696b292326', False),
 'mixed_forms': ((3, 1, 8, 8), '379bc1454cf0dc1cecd8ab271d92558fb2938ad64185d4676c4ade0764eaa626', False),
 'ints': ((1, 1, 8, 8), '55579bbbdad85c2a38699bbcdea03abc7108ca04430864ed5b306ab04e70a513', False),
 'ints_and_floats': ((2, 1, 8, 8), 'f637a91bc93432c6711c63e20799c9e3b2670053d4cf2799bb4438c37e26359d', False),
 'big_int_and_float': ((2, 5), '645ea12acef6ca5b3f22ea2cc0e8c0a35d9ee8c960fd8580f389a309cf17d5c4', False),
 'big_ints': ((2, 5), '05b8d813ce758dc3fafd7a9b32f3c906724ccc051edb329d5e80c673e1fd650a', False),
 'cifar': ((1, 3, 32, 32), '584d98996f44af97c686697022bc45df851f9d76d08ea743a2b033fb7086223e', False),
 'cifar_batch2_flat': ((2, 3, 32, 32), '6e15d08eda43d1ef63cf6d2eb8ac11945c7fbf3a1aededc87d2c53eaaaaf1880', False),
 'vector': ((1, 5), '9d85505e6a90f09365a10c8cd9143503df3a3375cf87c54a751fc69cae52fe0c', False),
 'explain': ((1, 1, 8, 8), 'd13e575f927ee6fd2f23f4c9d9c955be2beab776e3bd59f63d28251411457091', True),
 'nan': (400,
         'inputs[3]: expected finite numbers, found nan at index [0, 3, 2]',
         [(('inputs', 3), 'expected finite numbers, found nan at index [0, 3, 2]', 'finite_number')]),
 'inf': (400,
         'inputs[0]: expected finite numbers, found inf at index [0, 1, 5]',
         [(('inputs', 0), 'expected finite numbers, found inf at index [0, 1, 5]', 'finite_number')]),
 'neg_inf_flat': (400,
                  'inputs[0]: expected finite numbers, found -inf at index [10]',
                  [(('inputs', 0), 'expected finite numbers, found -inf at index [10]', 'finite_number')]),
 'string': (400,
            'inputs[0]: expected numbers, found a string',
            [(('inputs', 0), 'expected numbers, found a string', 'array_type')]),
 'null_leaf': (400,
               'inputs[0]: expected numbers, found null',
               [(('inputs', 0), 'expected numbers, found null', 'array_type')]),
 'object_leaf': (400,
                 'inputs[0]: expected numbers, found an object',
                 [(('inputs', 0), 'expected numbers, found an object', 'array_type')]),
 'bool_leaf': (400,
               'inputs[1]: expected numbers, found a boolean',
               [(('inputs', 1), 'expected numbers, found a boolean', 'array_type')]),
 'bool_all': (400,
              'inputs[0]: expected numbers, found a boolean',
              [(('inputs', 0), 'expected numbers, found a boolean', 'array_type')]),
 'bool_mixed_ints': (400,
                     'inputs[0]: expected numbers, found a boolean',
                     [(('inputs', 0), 'expected numbers, found a boolean', 'array_type')]),
 'huge': (400,
          'inputs[0]: expected finite numbers, found inf at index [0, 0, 0]',
          [(('inputs', 0), 'expected finite numbers, found inf at index [0, 0, 0]', 'finite_number')]),
 'huge_negative_flat': (400,
                        'inputs[0]: expected finite numbers, found -inf at index [63]',
                        [(('inputs', 0), 'expected finite numbers, found -inf at index [63]', 'finite_number')]),
 'huge_int': (400,
              'inputs[0]: expected nested arrays of numbers with equal lengths at each level',
              [(('inputs', 0),
                'expected nested arrays of numbers with equal lengths at each level',
                'array_type')]),
 'wrong_shape': (400,
                 'inputs[0]: expected 64 numbers or an array shaped [1, 8, 8] (or [8, 8]), got shape [5]',
                 [(('inputs', 0),
                   'expected 64 numbers or an array shaped [1, 8, 8] (or [8, 8]), got shape [5]',
                   'shape')]),
 'wrong_shape_2d': (400,
                    'inputs[0]: expected 64 numbers or an array shaped [1, 8, 8] (or [8, 8]), got shape [4, 16]',
                    [(('inputs', 0),
                      'expected 64 numbers or an array shaped [1, 8, 8] (or [8, 8]), got shape [4, 16]',
                      'shape')]),
 'wrong_shape_many': (400,
                      ('inputs[0]: expected 64 numbers or an array shaped [1, 8, 8] (or [8, 8]), got shape [5]; '
                      'inputs[2]: expected 64 numbers or an array shaped [1, 8, 8] (or [8, 8]), got shape [7]; '
                      'inputs[3]: expected 64 numbers or an array shaped [1, 8, 8] (or [8, 8]), got shape [2, 8, '
                      '8]'),
                      [(('inputs', 0),
                        'expected 64 numbers or an array shaped [1, 8, 8] (or [8, 8]), got shape [5]',
                        'shape'),
                       (('inputs', 2),
                        'expected 64 numbers or an array shaped [1, 8, 8] (or [8, 8]), got shape [7]',
                        'shape'),
                       (('inputs', 3),
                        'expected 64 numbers or an array shaped [1, 8, 8] (or [8, 8]), got shape [2, 8, 8]',
                        'shape')]),
 'ragged': (400,
            'inputs[0]: expected nested arrays of numbers with equal lengths at each level',
            [(('inputs', 0), 'expected nested arrays of numbers with equal lengths at each level', 'array_type')]),
 'ragged_scalar': (400,
                   'inputs[0]: expected nested arrays of numbers with equal lengths at each level',
                   [(('inputs', 0),
                     'expected nested arrays of numbers with equal lengths at each level',
                     'array_type')]),
 'scalar_item': (400,
                 'inputs[0]: expected an array of numbers, got a number',
                 [(('inputs', 0), 'expected an array of numbers, got a number', 'array_type')]),
 'string_item': (400,
                 'inputs[0]: expected an array of numbers, got a string',
                 [(('inputs', 0), 'expected an array of numbers, got a string', 'array_type')]),
 'empty_item': (400,
                'inputs[0]: expected numbers, got an empty array',
                [(('inputs', 0), 'expected numbers, got an empty array', 'array_empty')]),
 'empty_nested': (400,
                  'inputs[0]: expected numbers, got an empty array',
                  [(('inputs', 0), 'expected numbers, got an empty array', 'array_empty')]),
 'empty_batch': (400,
                 'inputs: empty batch: expected at least 1 item',
                 [(('inputs',), 'empty batch: expected at least 1 item', 'empty_batch')]),
 'too_many': (413,
              'inputs: 257 items, at most 256 are accepted per request (NOISEWISE_MAX_BATCH)',
              [(('inputs',),
                '257 items, at most 256 are accepted per request (NOISEWISE_MAX_BATCH)',
                'batch_too_large')]),
 'not_a_list': (400, 'inputs: expected an array', [(('inputs',), 'expected an array', 'list_type')]),
 'inputs_null': (400,
                 "body: expected 'inputs' (arrays of numbers) or 'images' (base64 PNG/JPEG strings)",
                 [((), "expected 'inputs' (arrays of numbers) or 'images' (base64 PNG/JPEG strings)", 'missing')]),
 'nothing': (400,
             "body: expected 'inputs' (arrays of numbers) or 'images' (base64 PNG/JPEG strings)",
             [((), "expected 'inputs' (arrays of numbers) or 'images' (base64 PNG/JPEG strings)", 'missing')]),
 'both': (400,
          'images[0]: not valid base64 (expected a base64-encoded PNG or JPEG)',
          [(('images', 0), 'not valid base64 (expected a base64-encoded PNG or JPEG)', 'image_base64')]),
 'extra_field': (400,
                 ("foo: unknown field: a request has 'inputs' (arrays of numbers) or 'images' (base64 PNG/JPEG), "
                 "and optionally 'explain'"),
                 [(('foo',),
                   ("unknown field: a request has 'inputs' (arrays of numbers) or 'images' (base64 PNG/JPEG), and "
                   "optionally 'explain'"),
                   'extra_forbidden')]),
 'explain_not_bool': (400,
                      'explain: expected true or false',
                      [(('explain',), 'expected true or false', 'bool_type')]),
 'many_bad': (400,
              ('inputs[0]: expected finite numbers, found nan at index [0]; inputs[1]: expected an array of '
              'numbers, got a string; inputs[2]: expected 64 numbers or an array shaped [1, 8, 8] (or [8, 8]), got '
              'shape [3]; inputs[3]: expected numbers, found a boolean; inputs[5]: expected an array of numbers, '
              'got null; ... and 1 more'),
              [(('inputs', 0), 'expected finite numbers, found nan at index [0]', 'finite_number'),
               (('inputs', 1), 'expected an array of numbers, got a string', 'array_type'),
               (('inputs', 2),
                'expected 64 numbers or an array shaped [1, 8, 8] (or [8, 8]), got shape [3]',
                'shape'),
               (('inputs', 3), 'expected numbers, found a boolean', 'array_type'),
               (('inputs', 5), 'expected an array of numbers, got null', 'array_type'),
               (('inputs', 6),
                'expected nested arrays of numbers with equal lengths at each level',
                'array_type')]),
 'nested_wrong_lengths': (400,
                          'inputs[0]: expected 3072 numbers or an array shaped [3, 32, 32], got shape [3, 32, 31]',
                          [(('inputs', 0),
                            'expected 3072 numbers or an array shaped [3, 32, 32], got shape [3, 32, 31]',
                            'shape')]),
 'cifar_nan': (400,
               'inputs[1]: expected finite numbers, found nan at index [3000]',
               [(('inputs', 1), 'expected finite numbers, found nan at index [3000]', 'finite_number')])}


def outcome(shape: tuple[int, ...], body: dict, booleans: bool = True) -> tuple:
    """What validation answers, in GOLDEN's form: (shape, batch SHA-256, explain) or (status, error, detail)."""
    try:
        request = PredictRequest.model_validate(body, context={"input": InputSpec(shape=shape), "booleans": booleans})
    except ValidationError as err:
        answer = error_response(err).model_dump()
        return (error_status(err), answer["error"], [(tuple(d["loc"]), d["msg"], d["type"]) for d in answer["detail"]])
    batch = request.batch
    assert batch.dtype == np.float32 and batch.flags.c_contiguous
    return (batch.shape, hashlib.sha256(batch.tobytes()).hexdigest(), request.explain)


def test_every_case_has_a_golden_answer():
    assert list(CASES) == list(GOLDEN)
    assert sum(len(g) == 3 and isinstance(g[0], int) for g in GOLDEN.values()) == 32  # the bad requests


@pytest.mark.parametrize("name", list(CASES))
def test_validation_answers_as_before(name):
    shape, body = CASES[name]
    assert outcome(shape, body) == GOLDEN[name]
    # what the service passes: whether the raw JSON body can hold a boolean at all
    text = json.dumps(body).encode()
    assert outcome(shape, body, booleans=has_json_booleans(text)) == GOLDEN[name]


@pytest.mark.parametrize("name", list(CASES))
def test_the_vectorized_path_takes_valid_batches_only(name):
    shape, body = CASES[name]
    fast = inputs_batch(body.get("inputs"), InputSpec(shape=shape))
    expected = GOLDEN[name]
    if isinstance(expected[0], int) and any(loc[:1] == ("inputs",) for loc, _, _ in expected[2]):
        assert fast is None  # a bad input: left to the item-by-item path, which names the problem
    elif isinstance(expected[0], int):  # the inputs are fine, another field is not
        assert fast is None or name in ("both", "extra_field", "explain_not_bool")
    elif name in ("mixed_forms", "cifar_batch2_flat", "big_int_and_float", "big_ints"):
        # items of different forms cannot be one array; integers past 2**53 would round twice through float64
        assert fast is None
    else:
        assert fast is not None
        assert (fast.shape, hashlib.sha256(np.ascontiguousarray(fast).tobytes()).hexdigest()) == expected[:2]


def test_booleans_are_found_without_the_body_scan():
    spec = InputSpec(shape=S5)
    for items in ([[1.5, 2, 3, 4, True]], [[0, 1, 2, 3, 4], [1, 1, 1, 1, False]]):
        assert inputs_batch(items, spec) is None
        assert inputs_batch(items, spec, booleans=False) is not None  # numpy alone takes true for 1.0
    assert has_json_booleans(b'{"inputs": [[1, 2]], "explain": true}')
    assert has_json_booleans('{"inputs": [[false]]}')
    assert not has_json_booleans(b'{"inputs": [[1e-05, 2.5, -3]], "explain": 0}')


def test_a_batch_over_the_limit_is_not_taken():
    spec = InputSpec(shape=S5, max_batch=2)
    assert inputs_batch([[1, 2, 3, 4, 5]] * 2, spec) is not None
    assert inputs_batch([[1, 2, 3, 4, 5]] * 3, spec) is None
    assert outcome(S5, {"inputs": [[1, 2, 3, 4, 5]] * 2}) == ((2, 5), hashlib.sha256(
        np.tile(np.arange(1, 6, dtype=np.float32), (2, 1)).tobytes()).hexdigest(), False)


# --- the answer ------------------------------------------------------------------------------------
SUMMARY = {
    "prediction_set": {"kind": "valid", "condition": "labels \"audited\" — naïve", "target_coverage": 0.9,
                       "alpha": 0.1, "method": "nacp_delta", "score": "aps", "eps": 0.2222222222, "delta": 0.01,
                       "Delta": 1.2345678e-05, "n": 1000, "full_sets": False, "extra_float": 0.123456789},
    "abstention": {"kind": "conservative", "condition": "x", "risk_target": 0.25, "delta": 0.1, "certified": True,
                   "risk_ucb": 0.2012345678, "coverage": float("nan"), "confidence": "msp", "threshold": 0.512345678,
                   "frontier": [[0.1, 0.2]], "can_certify": "r* >= 0.05 at coverage 0.5"},
    "ood": {"kind": "none", "condition": "", "scorer": "knn", "alpha_ood": 0.05, "n_calibration": 1000,
            "quantile": 3.0000001e-7},
    "assumptions": ["exchangeable", "日本語 \u2028 \\ \"q\""],
}
NAMES = ["cat", "chat \"noir\"", "naïve", "日本", "🐱 emoji", "back\\slash", "tab\tnew\nline", "\x01ctl", "\u2028"]
FLOATS = [0.73456789, 1e-07, 1.2345e-05, 0.00012345678, 12345.6789, -3.25, 0.0, -0.0, 1.0, 5e-05, 0.99995,
          float("nan"), float("inf"), -float("inf"), 1e20, 2.5e-300, 1 / 3]


def outputs(n: int, seed: int = 0) -> list[ModelOutput]:
    """Model outputs with awkward values: tiny, huge, non-finite floats, odd class names, empty sets."""
    rng = np.random.default_rng(seed)

    def pick(seq):
        return seq[int(rng.integers(len(seq)))]

    result = []
    for i in range(n):
        labels = rng.permutation(len(NAMES))[:3]
        top_k = [{"label": int(j), "class_name": NAMES[j], "probability": pick(FLOATS)} for j in labels]
        prediction_set = [] if i % 3 == 0 else [NAMES[j] for j in labels[: 1 + i % 3]]
        is_ood = bool(i % 2)
        reason = "ood" if is_ood else pick(["low_confidence", None])
        result.append(ModelOutput(
            label=int(labels[0]), class_name=NAMES[labels[0]], confidence=pick(FLOATS), top_k=top_k,
            prediction_set=prediction_set, ood_score=pick(FLOATS), ood_p_value=pick(FLOATS), is_ood=is_ood,
            decision="accept" if reason is None else "abstain", reason=reason))
    return result


def reference_json(outs: list[ModelOutput], served, guarantees, ids: list[str]) -> bytes:
    """The answer as it was built before: a validated ``Prediction`` per output in a ``PredictResponse``, which
    BentoML serialized with ``model_dump_json``."""
    predictions = []
    for out, pid in zip(outs, ids):
        fields = out.to_dict()
        fields["score"] = fields.pop("confidence")
        predictions.append(Prediction(id=pid, model=served.ref, threshold=served.threshold,
                                      set_reason=empty_set_reason(out.prediction_set, out.is_ood), **fields))
    return PredictResponse(predictions=predictions, guarantees=guarantees).model_dump_json().encode()


def same(a, b) -> bool:
    """Equal, NaN included."""
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


@pytest.fixture(scope="module")
def prediction_of():
    from noisewise.services.service import _prediction

    return _prediction


@pytest.mark.parametrize("threshold", [0.5123456789, None, 2.5e-05])
@pytest.mark.parametrize("explain", [False, True])
@pytest.mark.parametrize("n", [1, 3, 16])
def test_answer_bytes_are_those_of_the_pydantic_models(prediction_of, threshold, explain, n):
    guarantees = guarantees_from(SUMMARY)
    served = types.SimpleNamespace(ref=ModelRef(name="digits \"v\"", version="12"), threshold=threshold,
                                   summary=guarantees.summary(), guarantees=guarantees)
    block = served.guarantees if explain else served.summary
    outs = outputs(n, seed=n)
    predictions = [prediction_of(out, served) for out in outs]
    assert all(isinstance(p, Prediction) and uuid.UUID(p.id).version == 4 for p in predictions)
    written = predict_response_json(predictions, block)
    assert written == reference_json(outs, served, block, [p.id for p in predictions])
    assert len(json.loads(written)["predictions"]) == n


def test_served_predictions_carry_the_full_precision_values(prediction_of):
    """Metrics and the store read the prediction objects: every field as the validated model had it."""
    guarantees = guarantees_from(SUMMARY)
    served = types.SimpleNamespace(ref=ModelRef(name="m", version="1"), threshold=0.5123456789,
                                   summary=guarantees.summary(), guarantees=guarantees)
    for out in outputs(12, seed=7):
        new = prediction_of(out, served)
        fields = out.to_dict()
        fields["score"] = fields.pop("confidence")
        old = Prediction(id=new.id, model=served.ref, threshold=served.threshold,
                         set_reason=empty_set_reason(out.prediction_set, out.is_ood), **fields)
        for name in Prediction.model_fields:
            if name == "ood":
                for part in ("score", "p_value", "is_ood"):
                    assert same(getattr(new.ood, part), getattr(old.ood, part)), part
            elif name == "top_k":
                assert [(t.label, t.class_name) for t in new.top_k] == [(t.label, t.class_name) for t in old.top_k]
                for t, o in zip(new.top_k, old.top_k):
                    assert same(t.probability, o.probability)
            elif name == "score":
                assert same(new.score, old.score)
            else:
                assert getattr(new, name) == getattr(old, name), name
