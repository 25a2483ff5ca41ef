"""Per-server protocol adapters: how the load generator writes a request and reads the labels back.

Each adapter is a ``PredictProtocol`` (``scripts.benchlib.loadgen``): ``encode(draw)`` is the request
body for the draw's texts, ``labels(payload)`` the predicted label of each text, in order, from a 200
response, and ``score`` compares them with the true labels by name (``loadgen.label_matches``): every
server runs the same checkpoint, so each answers the artifact's label names, whatever they are and
however many. A body that does not parse raises ``ValueError``/``KeyError``/``TypeError``/``IndexError``,
which the client counts as ``bad_response``.

| server | request | response |
|---|---|---|
| ours | ``POST /predict`` ``{"text"}`` or ``{"texts"}`` | ``{"predictions": [{"label", "score"}]}`` |
| Triton (KServe v2) | ``POST /v2/models/<name>/infer``, BYTES ``text`` [n, 1] | ``outputs[label].data`` |
| Infinity | ``POST /classify`` ``{"model", "input": [...]}`` | ``data[i]``: every label with its score |
| TorchServe | ``POST /predictions/<name>`` ``{"text"}`` or ``{"texts"}`` (our handler) | as ours |
| Ray Serve | ``POST /predict`` ``{"text"}`` or ``{"texts"}`` (our deployment) | as ours |
"""

from __future__ import annotations

import orjson

from scripts.benchlib.loadgen import PredictProtocol, label_matches
from scripts.benchlib.workload import Draw


def normalize_label(label: object) -> str:
    """A label as a server sent it, as text (Triton's BYTES tensors come back as bytes)."""
    if isinstance(label, bytes):
        label = label.decode()
    if not isinstance(label, str):
        raise TypeError(f"label {label!r} is not a string")
    return label.strip()


def correct_count(predicted: list[str], labels: list[str | int]) -> int:
    """How many predicted labels match the true ones (by name); raises on a count mismatch."""
    if len(predicted) != len(labels):
        raise ValueError(f"{len(predicted)} predictions for {len(labels)} texts")
    return sum(label_matches(y, normalize_label(p)) for p, y in zip(predicted, labels, strict=True))


class Adapter(PredictProtocol):
    """A peer's protocol: its predict path, its readiness path, its body and its labels."""

    name = "base"
    path = "/predict"
    health_path = "/health"

    def encode(self, draw: Draw) -> bytes:
        return orjson.dumps(draw.body())

    def labels(self, payload: bytes) -> list[str]:
        return [p["label"] for p in orjson.loads(payload)["predictions"]]

    def score(self, payload: bytes, labels: list[str | int]) -> tuple[int, int]:
        return correct_count(self.labels(payload), labels), 0


class OursAdapter(Adapter):
    """This project's server; its own ``score`` also counts cache hits (the side-by-side disables the cache)."""

    name = "ours"
    health_path = "/ready"

    def score(self, payload: bytes, labels: list[str | int]) -> tuple[int, int]:
        return PredictProtocol.score(self, payload, labels)


class TritonAdapter(Adapter):
    """Triton's KServe v2 HTTP/JSON protocol; a batch of n texts is one request of shape [n, 1]."""

    name = "triton"
    health_path = "/v2/health/ready"

    def __init__(self, model: str = "sentiment") -> None:
        self.model = model
        self.path = f"/v2/models/{model}/infer"

    def encode(self, draw: Draw) -> bytes:
        return orjson.dumps({
            "inputs": [{"name": "text", "shape": [len(draw.texts), 1], "datatype": "BYTES", "data": draw.texts}],
            "outputs": [{"name": "label", "parameters": {"binary_data": False}}],
        })

    def labels(self, payload: bytes) -> list[str]:
        for output in orjson.loads(payload)["outputs"]:
            if output["name"] == "label":
                data = output["data"]
                # JSON BYTES tensors come back flat; a nested [[...]] form is accepted too.
                return [row[0] if isinstance(row, list) else row for row in data]
        raise KeyError("no 'label' output in the response")


class InfinityAdapter(Adapter):
    """Infinity's ``/classify``: each input gets every label with its score; the prediction is the top one."""

    name = "infinity"
    path = "/classify"
    health_path = "/health"

    def __init__(self, model: str = "sentiment") -> None:
        self.model = model

    def encode(self, draw: Draw) -> bytes:
        return orjson.dumps({"model": self.model, "input": draw.texts, "raw_scores": False})

    def labels(self, payload: bytes) -> list[str]:
        return [max(scores, key=lambda s: s["score"])["label"] for scores in orjson.loads(payload)["data"]]


class TorchServeAdapter(Adapter):
    """TorchServe's inference API with this benchmark's handler (``torchserve_handler.py``): our body and answer."""

    name = "torchserve"
    health_path = "/ping"

    def __init__(self, model: str = "sentiment") -> None:
        self.model = model
        self.path = f"/predictions/{model}"


class RayAdapter(Adapter):
    """Ray Serve's HTTP proxy in front of this benchmark's deployment (``serve_ray.py``): our body and answer."""

    name = "ray"
    path = "/predict"
    health_path = "/-/healthz"


ADAPTERS: dict[str, type[Adapter]] = {
    cls.name: cls for cls in (OursAdapter, TritonAdapter, InfinityAdapter, TorchServeAdapter, RayAdapter)
}
