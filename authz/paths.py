"""Request path -> what kind of request this is, and which model it addresses. Pure.

Model name parsing follows the two protocols KServe serves:
- KServe v1:  /v1/models/{name}           /v1/models/{name}:predict   (:explain, ...)
- Open Inference Protocol v2:
              /v2/models/{name}           /v2/models/{name}/ready     /v2/models/{name}/infer
              /v2/models/{name}/versions/{v}/infer
For any configured protected prefix the model is the first segment after it (for prefixes under
/v1/, cut at the ':' of the verb).
The query string never takes part in matching or bucket keys.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from .config.settings import PathSettings


class PathKind(Enum):
    PUBLIC = "public"
    PROTECTED = "protected"
    OTHER = "other"
    INVALID = "invalid"


@dataclass(frozen=True, slots=True)
class Target:
    kind: PathKind
    model: str = ""  # empty on an LLM route: the body names the model
    reason: str = ""  # why INVALID
    # How a body is read for its cost: "v1" (KServe v1), "v2" (Open Inference Protocol v2) or
    # "openai" (an LLM route).
    protocol: str = ""


# Envoy's own default limit on request headers is 60 KiB, and real inference paths are short;
# anything past 4 KiB is refused before it is parsed.
MAX_PATH_BYTES = 4096
# KServe names are DNS labels; Triton/OIP allow '_' and '.' too. Nothing that needs escaping.
_MODEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def valid_model_name(name: str) -> bool:
    return _MODEL.fullmatch(name) is not None


# Encoded '/', '\' and '.' let a path mean something else after another hop decodes it.
_ENCODED_SEPARATORS = re.compile(r"%(2[fFeE]|5[cC]|00)")
_MEMO_MAX = 4096


class PathClassifier:
    def __init__(self, settings: PathSettings) -> None:
        self._public = frozenset(settings.public_paths)
        self._llm = frozenset(settings.llm_routes)
        self._prefixes = settings.protected_prefixes
        self._memo: dict[str, Target] = {}

    def classify(self, raw_path: str) -> Target:
        found = self._memo.get(raw_path)
        if found is None:
            found = self._classify(raw_path)
            # Paths are caller-chosen: memoize only a bounded number of them.
            if len(self._memo) < _MEMO_MAX:
                self._memo[raw_path] = found
        return found

    def _classify(self, raw_path: str) -> Target:
        if not raw_path:
            return Target(PathKind.INVALID, reason="missing_path")
        if len(raw_path) > MAX_PATH_BYTES:
            return Target(PathKind.INVALID, reason="path_too_long")
        path = raw_path.split("?", 1)[0].split("#", 1)[0]
        if not path.startswith("/") or not path.isprintable() or " " in path or "\\" in path:
            return Target(PathKind.INVALID, reason="invalid_path")
        if _ENCODED_SEPARATORS.search(path):
            return Target(PathKind.INVALID, reason="invalid_path")
        segments = path.split("/")[1:]
        # Empty inner segments ('//') and dot segments are what path traversal is made of;
        # Envoy's normalize_path removes dots but keeps '//' (merge_slashes is off in sidecars).
        if any(s in (".", "..") for s in segments) or "" in segments[:-1]:
            return Target(PathKind.INVALID, reason="invalid_path")
        if path in self._public:
            return Target(PathKind.PUBLIC)
        if path in self._llm:
            return Target(PathKind.PROTECTED, protocol="openai")
        for prefix in self._prefixes:
            if path.startswith(prefix):
                name = path[len(prefix):].split("/", 1)[0]
                if prefix.startswith("/v1/"):
                    # KServe v1 puts the verb after a colon (:predict, :explain); OIP v2 has
                    # no such suffix, so a ':' there stays in the name and fails the check.
                    name = name.split(":", 1)[0]
                if not _MODEL.fullmatch(name):
                    return Target(PathKind.INVALID, reason="invalid_model_name")
                return Target(PathKind.PROTECTED, model=name,
                              protocol="v1" if prefix.startswith("/v1/") else "v2")
        return Target(PathKind.OTHER)
