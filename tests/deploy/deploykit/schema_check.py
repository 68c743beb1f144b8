"""Validate manifests against schemas. Runs in the tools venv (.tools/deploy), which has
kubernetes-validate and jsonschema; the tests call it once per session:

    .tools/deploy/bin/python tests/deploy/deploykit/schema_check.py < request.json

request: {"k8s_versions": ["1.29.0", ...], "istio_schemas": "<path of istio-v1.yaml>",
          "docs": [{"ref": "...", "doc": {...}}, ...]}
reply (stdout): [{"ref": "...", "checked_by": "...", "error": "..." | null}, ...]

Built-in kinds: kubernetes-validate in strict mode (an unknown field is an error).
Istio kinds: the CRD's openAPIV3Schema, made strict the way the API server's strict field
validation behaves: objects that declare properties accept no others (unless
x-kubernetes-preserve-unknown-fields); then the CRD's CEL rules (x-kubernetes-validations),
evaluated with cel-python, as the API server would on create. istiod's own validation goes
further; deploykit/istio.py re-implements the parts that matter here.
"""

from __future__ import annotations

import json
import sys
from typing import Any
from urllib.parse import urlsplit

import celpy
import jsonschema
import kubernetes_validate
import yaml

_CEL = celpy.Environment()
# Kubernetes' CEL library functions used by the Istio CRDs, beyond standard CEL.
_CEL_FUNCTIONS = {
    "url": lambda value: value,
    "getScheme": lambda value: celpy.celtypes.StringType(urlsplit(str(value)).scheme),
}


def cel_errors(schema: Any, value: Any, path: str = "") -> list[str]:
    """Evaluate every x-kubernetes-validations rule that applies to `value`."""
    if not isinstance(schema, dict):
        return []
    errors = []
    for rule in schema.get("x-kubernetes-validations", []):
        program = _CEL.program(_CEL.compile(rule["rule"]), functions=_CEL_FUNCTIONS)
        try:
            ok = program.evaluate({"self": celpy.json_to_cel(value)})
        except Exception as e:  # a rule that cannot be evaluated is a failure, not a pass
            errors.append(f"{path or '<root>'}: CEL rule {rule['rule']!r} failed to run: {e}")
            continue
        if ok is not True and not (isinstance(ok, celpy.celtypes.BoolType) and bool(ok)):
            errors.append(f"{path or '<root>'}: {rule.get('message', rule['rule'])}")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            sub = props.get(key, extra if isinstance(extra, dict) else None)
            errors += cel_errors(sub, item, f"{path}/{key}" if path else str(key))
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            errors += cel_errors(schema["items"], item, f"{path}/{i}")
    return errors


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
    originals = {(entry["group"] + "/" + entry["version"], kind): entry["schema"]
                 for kind, entry in istio.items()}
    results = []
    for item in request["docs"]:
        doc, ref = item["doc"], item["ref"]
        key = (doc.get("apiVersion"), doc.get("kind"))
        if key in validators:
            errors = sorted(validators[key].iter_errors(doc), key=lambda e: list(e.path))
            messages = [f"{'/'.join(map(str, e.path)) or '<root>'}: {e.message}"
                        for e in errors]
            if not messages:  # CEL rules assume a structurally valid object
                messages = cel_errors(originals[key], doc)
            results.append({"ref": ref, "checked_by": "istio-crd-schema",
                            "error": "; ".join(messages) or None})
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
