"""Path classification and model-name parsing (pure)."""

from __future__ import annotations

import pytest

from authz.config.settings import PathSettings
from authz.paths import PathClassifier, PathKind, Target

C = PathClassifier(PathSettings())


@pytest.mark.parametrize(
    ("path", "model"),
    [
        ("/v1/models/iris:predict", "iris"),
        ("/v1/models/iris:explain", "iris"),
        ("/v1/models/iris", "iris"),
        ("/v1/models/iris:predict?debug=1", "iris"),
        ("/v2/models/llama-7b/infer", "llama-7b"),
        ("/v2/models/llama-7b/versions/3/infer", "llama-7b"),
        ("/v2/models/llama-7b/ready", "llama-7b"),
        ("/v2/models/resnet_50.onnx", "resnet_50.onnx"),
        ("/v2/models/m/infer?x=/../../etc", "m"),
    ],
)
def test_models(path: str, model: str) -> None:
    protocol = "v1" if path.startswith("/v1/") else "v2"
    assert C.classify(path) == Target(PathKind.PROTECTED, model=model, protocol=protocol)


def test_llm_routes_leave_the_model_to_the_body() -> None:
    c = PathClassifier(PathSettings(llm_routes=("/v1/chat/completions",)))
    assert c.classify("/v1/chat/completions") == Target(PathKind.PROTECTED, protocol="openai")
    assert c.classify("/v1/chat/completions?stream=1").protocol == "openai"
    assert C.classify("/v1/chat/completions").kind is PathKind.OTHER  # off unless configured


@pytest.mark.parametrize("path", ["/health", "/ready", "/v2/health/live", "/v2/health/ready",
                                  "/health?probe=1"])
def test_public(path: str) -> None:
    assert C.classify(path).kind is PathKind.PUBLIC


@pytest.mark.parametrize("path", ["/", "/metrics", "/v3/models/x", "/v1/modelsx", "/healthz/x",
                                  "/health/"])
def test_other(path: str) -> None:
    assert C.classify(path).kind is PathKind.OTHER


@pytest.mark.parametrize(
    "path",
    [
        "", "v1/models/x", "/v1/models/../admin", "/v1/models/x/../../y", "/v1//models/x",
        "/v1/models//x", "/health/../v1/models/x", "/v1/models/%2e%2e/x", "/v1/models/a%2Fb",
        "/v1/models/a\\b", "/v1/models/a\r\nx", "/v1/models/:predict", "/v1/models/",
        "/v2/models/-x/infer", "/v2/models/" + "a" * 200 + "/infer", "/v1/models/x y",
        "/" + "a" * 5000, "/v1/models/x\x00", "/v2/models/iris:x/infer",
    ],
)
def test_invalid(path: str) -> None:
    assert C.classify(path).kind is PathKind.INVALID


def test_query_does_not_change_the_model() -> None:
    assert C.classify("/v1/models/m:predict?a=1").model == C.classify("/v1/models/m:predict").model
