"""The Open Inference Protocol (KServe v2) through the real `tritonclient[http]` against a running dede:
same scores as /detect, and clear 4xx for what an untrusted caller may send."""

from __future__ import annotations

import json
import struct

import httpx
import numpy as np
import pytest
from conftest import API_KEY, SERVER_LIMITS, ServerProcess, encode, random_images
from synthetic_bundle import THRESHOLD, expected_score

tritonclient_http = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is in the dev extra")
from tritonclient.utils import InferenceServerException  # noqa: E402

MODEL = "synthetic"
KEY = {"X-API-Key": API_KEY}


def key() -> dict[str, str]:
    """A fresh headers dict per tritonclient call: the client adds its own headers to the one given."""
    return dict(KEY)


@pytest.fixture
def triton(server: ServerProcess):  # noqa: ANN201 - tritonclient's own type
    client = tritonclient_http.InferenceServerClient(server.url.removeprefix("http://"))
    yield client
    client.close()


def _uint8_input(images_nhwc: np.ndarray, binary: bool = True):  # noqa: ANN202
    tensor = np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2))
    given = tritonclient_http.InferInput("images", list(tensor.shape), "UINT8")
    given.set_data_from_numpy(tensor, binary_data=binary)
    return given


def _detect_scores(server: ServerProcess, images_nhwc: np.ndarray) -> list[float]:
    files = [("images", (f"{i}.png", encode(img), "image/png")) for i, img in enumerate(images_nhwc)]
    answer = httpx.post(server.url + "/detect", files=files, headers=KEY, timeout=30).json()
    return [result["score"] for result in answer["images"]]


def test_probes_and_metadata(triton) -> None:  # noqa: ANN001
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.is_model_ready(MODEL, headers=key())
    assert "binary_tensor_data" in triton.get_server_metadata()["extensions"]
    meta = triton.get_model_metadata(MODEL, headers=key())
    assert meta["name"] == MODEL and meta["versions"] == ["test-1"]
    assert {i["name"]: (i["datatype"], i["shape"]) for i in meta["inputs"]} == {
        "images": ("UINT8", [-1, 3, 32, 32]),
        "encoded_images": ("BYTES", [-1]),
    }
    assert [(o["name"], o["datatype"]) for o in meta["outputs"]] == [("score", "FP32"), ("flagged", "BOOL")]
    assert meta["parameters"]["threshold"] == pytest.approx(THRESHOLD)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_uint8_tensor_scores_equal_detect(server: ServerProcess, triton, binary: bool) -> None:  # noqa: ANN001
    images = random_images(6, seed=21)
    outputs = [tritonclient_http.InferRequestedOutput(n, binary_data=binary) for n in ("score", "flagged")]
    result = triton.infer(MODEL, [_uint8_input(images, binary)], outputs=outputs, headers=key())
    scores, flagged = result.as_numpy("score"), result.as_numpy("flagged")
    assert scores.dtype == np.float32 and flagged.dtype == np.bool_ and scores.shape == (6,)
    assert scores.tolist() == pytest.approx(_detect_scores(server, images), rel=1e-6)
    assert scores.tolist() == pytest.approx([expected_score(i.transpose(2, 0, 1)) for i in images], rel=1e-5)
    assert flagged.tolist() == [bool(s > THRESHOLD) for s in scores]
    assert 0 < flagged.sum() < 6  # both kinds in the sample


def test_encoded_images_as_bytes(server: ServerProcess, triton) -> None:  # noqa: ANN001
    images = random_images(3, seed=22)
    encoded = np.array([encode(img) for img in images], dtype=np.object_)
    given = tritonclient_http.InferInput("encoded_images", [3], "BYTES")
    given.set_data_from_numpy(encoded)
    result = triton.infer(MODEL, [given], headers=key())  # no outputs named: all, binary
    assert result.as_numpy("score").tolist() == pytest.approx(_detect_scores(server, images), rel=1e-6)


def test_encoded_images_as_json_base64(server: ServerProcess) -> None:
    import base64

    images = random_images(2, seed=23)
    body = {
        "id": "req-7",
        "inputs": [
            {
                "name": "encoded_images",
                "datatype": "BYTES",
                "shape": [2],
                "data": [base64.b64encode(encode(i)).decode() for i in images],
            }
        ],
    }
    answer = httpx.post(f"{server.url}/v2/models/{MODEL}/infer", json=body, headers=KEY, timeout=30)
    assert answer.status_code == 200, answer.text
    outputs = {o["name"]: o for o in answer.json()["outputs"]}
    assert answer.json()["id"] == "req-7"
    assert outputs["score"]["data"] == pytest.approx(_detect_scores(server, images), rel=1e-6)


def _status(call) -> tuple[int, str]:  # noqa: ANN001
    with pytest.raises(InferenceServerException) as caught:
        call()
    return int(caught.value.status()), caught.value.message()


def test_tritonclient_sees_clear_errors(triton) -> None:  # noqa: ANN001
    images = random_images(2, seed=24)
    assert _status(lambda: triton.infer("other", [_uint8_input(images)], headers=key()))[0] == 404
    status, message = _status(lambda: triton.infer(MODEL, [_uint8_input(images)]))
    assert status == 401 and "API key" in message
    wrong_size = random_images(2, seed=24, size=(16, 16))
    status, message = _status(lambda: triton.infer(MODEL, [_uint8_input(wrong_size)], headers=key()))
    assert status == 400 and "[N, 3, 32, 32]" in message
    floats = tritonclient_http.InferInput("images", [1, 3, 32, 32], "FP32")
    floats.set_data_from_numpy(np.zeros((1, 3, 32, 32), np.float32))
    status, message = _status(lambda: triton.infer(MODEL, [floats], headers=key()))
    assert status == 400 and "UINT8" in message
    too_many = SERVER_LIMITS["max_images_per_request"] + 1
    many = np.zeros((too_many, 32, 32, 3), np.uint8)
    status, message = _status(lambda: triton.infer(MODEL, [_uint8_input(many)], headers=key()))
    assert status in (413, 422), message  # over the count, or over the body limit first
    bad_image = tritonclient_http.InferInput("encoded_images", [1], "BYTES")
    bad_image.set_data_from_numpy(np.array([b"not an image"], dtype=np.object_))
    status, message = _status(lambda: triton.infer(MODEL, [bad_image], headers=key()))
    assert 400 <= status < 500 and "encoded_images[0]" in message


def _post(server: ServerProcess, body: bytes, **headers: str) -> httpx.Response:
    url = f"{server.url}/v2/models/{MODEL}/infer"
    return httpx.post(url, content=body, headers={**KEY, **headers}, timeout=30)


def test_untrusted_requests_get_4xx(server: ServerProcess) -> None:
    def header(**tensor: object) -> bytes:
        base = {"name": "images", "datatype": "UINT8", "shape": [1, 3, 32, 32]}
        return json.dumps({"inputs": [{**base, **tensor}]}).encode()

    cases = {
        "not json": (_post(server, b"{nope"), 400, "JSON"),
        "no inputs": (_post(server, b"{}"), 400, "exactly one input"),
        "size mismatch": (
            _post(
                server,
                header(parameters={"binary_data_size": 3072}) + b"\0" * 100,
                **{
                    "Inference-Header-Content-Length": str(len(header(parameters={"binary_data_size": 3072})))
                },
            ),
            400,
            "binary_data_size",
        ),
        "header length outside body": (
            _post(server, header(data=[0] * 3072), **{"Inference-Header-Content-Length": "999999"}),
            400,
            "Inference-Header-Content-Length",
        ),
        "values out of range": (_post(server, header(data=[300] * 3072)), 400, "0..255"),
        "ragged data": (_post(server, header(data=[[1, 2], [3]])), 400, "regular"),
        "negative shape": (_post(server, header(shape=[-1, 3, 32, 32], data=[])), 400, "shape"),
        "zero images": (_post(server, header(shape=[0, 3, 32, 32], data=[])), 422, "no images"),
        "compressed": (
            _post(server, header(data=[0] * 3072), **{"Content-Encoding": "gzip"}),
            415,
            "uncompressed",
        ),
        "unknown output": (
            _post(
                server,
                json.dumps(
                    {
                        "inputs": [
                            {
                                "name": "images",
                                "datatype": "UINT8",
                                "shape": [1, 3, 32, 32],
                                "data": [0] * 3072,
                            }
                        ],
                        "outputs": [{"name": "reconstruction"}],
                    }
                ).encode(),
            ),
            400,
            "unknown output",
        ),
        "bytes element runs past": (
            _post(
                server,
                json.dumps(
                    {
                        "inputs": [
                            {
                                "name": "encoded_images",
                                "datatype": "BYTES",
                                "shape": [1],
                                "parameters": {"binary_data_size": 8},
                            }
                        ]
                    }
                ).encode()
                + struct.pack("<I", 1000)
                + b"abcd",
                **{
                    "Inference-Header-Content-Length": str(
                        len(
                            json.dumps(
                                {
                                    "inputs": [
                                        {
                                            "name": "encoded_images",
                                            "datatype": "BYTES",
                                            "shape": [1],
                                            "parameters": {"binary_data_size": 8},
                                        }
                                    ]
                                }
                            )
                        )
                    )
                },
            ),
            400,
            "runs past",
        ),
    }
    for case, (response, status, words) in cases.items():
        assert response.status_code == status, (case, response.text)
        assert words in response.json()["error"], (case, response.text)
    huge = httpx.post(
        f"{server.url}/v2/models/{MODEL}/infer",
        content=b"{" + b" " * 3_000_000 + b"}",
        headers=KEY,
        timeout=30,
    )
    assert huge.status_code == 413
