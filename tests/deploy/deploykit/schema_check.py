"""Validate manifests against schemas. Runs in the tools venv (.tools/deploy), which has
kubernetes-validate and jsonschema; the tests call it once per session:

    .tools/deploy/bin/python tests/deploy/deploykit/schema_check.py < request.json

request: {"k8s_versions": ["1.29.0", ...], "istio_schemas": "<path of istio-v1.yaml>",
          "docs": [{"ref": "...", "doc": {...}}, ...]}
reply (stdout): [{"ref": "...", "checked_by": "...", "error": "..." | null}, ...]

Built-in kinds: kubernetes-validate in strict mode (an unknown field is an error).
Istio kinds: the CRD's openAPIV3Schema, made strict the way the API server's strict field
validation behaves: objects that declare properties accept no others (unless
x-kubernetes-preserve-unknown-fields). CEL rules (x-kubernetes-validations) are not evaluated
here; the rules that matter are re-implemented in deploykit/istio.py.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import jsonschema
import kubernetes_validate
import yaml


def strict(schema: Any) -> Any:
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()
           if not k.startswith("x-kubernetes-validations")}
    if schema.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if schema.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if ("properties" in schema and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def crd_root(schema: dict[str, Any]) -> dict[str, Any]:
    """A CRD schema describes spec/status; the API server supplies the object envelope."""
    props = dict(schema.get("properties", {}))
    props.setdefault("apiVersion", {"type": "string"})
    props.setdefault("kind", {"type": "string"})
    props.setdefault("metadata", {"type": "object"})
    return {**schema, "properties": props}


def main() -> int:
    request = json.load(sys.stdin)
    with open(request["istio_schemas"]) as f:
        istio = yaml.safe_load(f)
    validators = {
        (entry["group"] + "/" + entry["version"], kind):
            jsonschema.Draft7Validator(crd_root(strict(entry["schema"])))
        for kind, entry in istio.items()
    }
    results = []
    for item in request["docs"]:
        doc, ref = item["doc"], item["ref"]
        key = (doc.get("apiVersion"), doc.get("kind"))
        if key in validators:
            errors = sorted(validators[key].iter_errors(doc), key=lambda e: list(e.path))
            results.append({"ref": ref, "checked_by": "istio-crd-schema",
                            "error": "; ".join(
                                f"{'/'.join(map(str, e.path)) or '<root>'}: {e.message}"
                                for e in errors) or None})
            continue
        for version in request["k8s_versions"]:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
                error = None
            except kubernetes_validate.ValidationError as e:
                path = "/".join(str(p) for p in e.path) or "<root>"
                error = f"{path}: {e.message}"
            except kubernetes_validate.SchemaNotFoundError as e:
                error = f"no schema: {e.message}"
            results.append({"ref": ref, "checked_by": f"kubernetes {version}", "error": error})
    json.dump(results, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
