"""Regenerate ``tests/kuberay/crds.json.gz``: the KubeRay schemas ``tests/test_clusters.py`` checks
``clusters/kuberay/*.yaml`` against.

The output holds one structural schema per kind (``RayCluster``, ``RayJob``, ``RayService``) in
the form of a CRD's ``openAPIV3Schema``, trimmed to what validation needs (``properties``,
``type``, ``required``, ``items``, ``additionalProperties``, ``enum``, ``format``, ``minimum``,
``minItems``, ``x-kubernetes-*``; no ``description``), plus ``definitions`` for the Kubernetes
types they embed, referenced as ``{"$ref": "<name>"}``.

Two ways to build it (the vendored file was made the first way; tests/kuberay/README.md says
why):

1. From the KubeRay types transcribed in ``kuberay_v1.6.2_types.yaml`` and the Kubernetes
   OpenAPI definitions that the ``kubernetes-validate`` wheel on PyPI ships
   (``kubernetes_validate/kubernetes-json-schema/v1.33.0-local/_definitions.json``)::

       python tests/kuberay/trim_crds.py --download          # pip-downloads the wheel to a temp dir
       python tests/kuberay/trim_crds.py --k8s-defs PATH/_definitions.json

2. From the real CRD files of a KubeRay release (``ray-operator/config/crd/bases/`` or
   ``helm-chart/kuberay-operator/crds/`` of ray-project/kuberay)::

       python tests/kuberay/trim_crds.py --crd ray.io_rayclusters.yaml \\
           --crd ray.io_rayjobs.yaml --crd ray.io_rayservices.yaml --source "kuberay vX.Y.Z"

   (Real CRDs inline every embedded type, so that output has no ``definitions``; the gzip
   keeps it small because the pod template repeats.)

The output is deterministic (sorted keys, gzip without a timestamp), so a regeneration from the
same inputs changes nothing in git.
"""

from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
TYPES_FILE = HERE / "kuberay_v1.6.2_types.yaml"
OUTPUT = HERE / "crds.json.gz"
K8S_WHEEL = "kubernetes-validate==1.37.0"
K8S_API = "v1.33.0"
K8S_DEFS_IN_WHEEL = f"kubernetes_validate/kubernetes-json-schema/{K8S_API}-local/_definitions.json"

# Schema keywords a structural validation needs; everything else (description, default,
# x-kubernetes-group-version-kind, patch strategies, ...) is dropped.
KEEP = {"type", "properties", "required", "items", "additionalProperties", "enum", "format",
        "minimum", "maximum", "minItems", "maxItems", "minLength", "maxLength", "pattern",
        "x-kubernetes-int-or-string", "x-kubernetes-preserve-unknown-fields",
        "x-kubernetes-list-type", "x-kubernetes-list-map-keys", "x-kubernetes-map-type",
        "x-kubernetes-embedded-resource", "anyOf", "$ref"}
SCALARS = {"string", "integer", "number", "boolean"}
OBJECT_META = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
EMBEDDED_META = "EmbeddedObjectMeta"
# controller-gen (generateEmbeddedObjectMeta=true, as KubeRay builds its CRDs) keeps only these
# fields of an ObjectMeta embedded in a CRD (a pod template's metadata, a Service's metadata).
EMBEDDED_META_SCHEMA = {"type": "object", "properties": {
    "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    "finalizers": {"type": "array", "items": {"type": "string"}},
    "labels": {"type": "object", "additionalProperties": {"type": "string"}},
    "name": {"type": "string"},
    "namespace": {"type": "string"},
}}
# Kubernetes definitions whose JSON form is not a plain typed schema.
SPECIAL = {
    "io.k8s.apimachinery.pkg.util.intstr.IntOrString": {"x-kubernetes-int-or-string": True},
    "io.k8s.apimachinery.pkg.api.resource.Quantity": {"x-kubernetes-int-or-string": True},
    "io.k8s.apimachinery.pkg.apis.meta.v1.Time": {"type": "string", "format": "date-time"},
    "io.k8s.apimachinery.pkg.apis.meta.v1.MicroTime": {"type": "string", "format": "date-time"},
    "io.k8s.apimachinery.pkg.runtime.RawExtension": {"type": "object",
                                                     "x-kubernetes-preserve-unknown-fields": True},
    "io.k8s.apiextensions-apiserver.pkg.apis.apiextensions.v1.JSON": {
        "x-kubernetes-preserve-unknown-fields": True},
}


def trim(node: Any) -> Any:
    """A schema node without descriptions and other keywords validation does not use."""
    if isinstance(node, list):
        return [trim(item) for item in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key not in KEEP:
            continue
        if key == "properties":
            out[key] = {name: trim(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "anyOf"):
            out[key] = trim(value)
        else:
            out[key] = value
    return out


# --- way 1: transcribed KubeRay types + Kubernetes OpenAPI definitions ---

def type_schema(expr: Any, types: dict[str, Any], refs: set[str]) -> dict:
    """The schema of a type expression from the transcription file (see its header)."""
    if isinstance(expr, dict):
        extra = {k: v for k, v in expr.items() if k != "type"}
        return {**type_schema(expr["type"], types, refs), **extra}
    if expr in SCALARS:
        return {"type": expr}
    if expr.startswith("[]"):
        return {"type": "array", "items": type_schema(expr[2:], types, refs)}
    if expr.startswith("map[") and expr.endswith("]"):
        return {"type": "object", "additionalProperties": type_schema(expr[4:-1], types, refs)}
    if expr.startswith("io.k8s."):
        refs.add(expr)
        return {"$ref": expr}
    spec = types[expr]  # KeyError: a type the transcription does not define
    if "enum" in spec:
        return {"type": "string", "enum": list(spec["enum"])}
    schema: dict[str, Any] = {"type": "object", "properties": {
        name: type_schema(sub, types, refs) for name, sub in spec["properties"].items()}}
    if spec.get("required"):
        schema["required"] = list(spec["required"])
    return schema


def kind_schemas(transcription: dict) -> tuple[dict[str, dict], set[str]]:
    """``{kind: openAPIV3Schema}`` for the transcribed kinds, and the io.k8s.* names they use."""
    refs: set[str] = set()
    kinds = {}
    for kind, spec_type in transcription["kinds"].items():
        kinds[kind] = {"type": "object", "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": type_schema(spec_type, transcription["types"], refs),
        }}
    return kinds, refs


def convert_k8s(node: Any) -> Any:
    """A Kubernetes OpenAPI (JSON Schema) node in CRD form: one type, no nulls, local refs."""
    if isinstance(node, list):
        return [convert_k8s(item) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[-1]
        return {"$ref": EMBEDDED_META if name == OBJECT_META else name}
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key not in KEEP:
            continue
        if key == "type" and isinstance(value, list):
            kinds = [t for t in value if t != "null"]
            value = kinds[0] if len(kinds) == 1 else kinds
        elif key == "enum":
            value = [v for v in value if v is not None]
        elif key == "properties":
            value = {name: convert_k8s(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties"):
            value = convert_k8s(value)
        out[key] = value
    return out


def k8s_definitions(defs: dict[str, Any], roots: set[str]) -> dict[str, Any]:
    """The converted definitions reachable from ``roots`` (embedded ObjectMeta trimmed)."""
    out: dict[str, Any] = {}
    todo = sorted(roots)
    while todo:
        name = todo.pop()
        if name in out:
            continue
        if name == EMBEDDED_META:
            out[name] = EMBEDDED_META_SCHEMA
            continue
        out[name] = SPECIAL.get(name) or convert_k8s(defs[name])
        todo.extend(sorted(_refs(out[name]) - set(out)))
    return out


def _refs(node: Any) -> set[str]:
    found: set[str] = set()
    if isinstance(node, dict):
        if "$ref" in node:
            found.add(node["$ref"])
        for value in node.values():
            found |= _refs(value)
    elif isinstance(node, list):
        for value in node:
            found |= _refs(value)
    return found


def build_from_types(transcription: dict, k8s_defs: dict[str, Any], k8s_source: str) -> dict:
    kinds, refs = kind_schemas(transcription)
    return {
        "format": 1,
        "kuberay_version": transcription["kuberay_version"],
        "source": {
            "kuberay": f"{TYPES_FILE.name} (KubeRay {transcription['kuberay_version']} API "
                       "reference, transcribed)",
            "kubernetes": k8s_source,
        },
        "kinds": kinds,
        "definitions": k8s_definitions(k8s_defs, refs),
    }


def load_k8s_defs(path: Path | None, download: bool) -> tuple[dict[str, Any], str]:
    if path is not None:
        data = json.loads(path.read_text())
        # Name the wheel, not this machine's path, when the file is the one from the wheel.
        source = (f"{K8S_WHEEL} wheel (PyPI): {K8S_DEFS_IN_WHEEL}"
                  if path.as_posix().endswith(K8S_DEFS_IN_WHEEL) else str(path))
        return data.get("$defs") or data["definitions"], source
    if not download:
        sys.exit("give --k8s-defs PATH/_definitions.json or --download (see the docstring)")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp,
                        K8S_WHEEL], check=True)
        wheel = next(Path(tmp).glob("kubernetes_validate-*.whl"))
        with zipfile.ZipFile(wheel) as archive:
            data = json.loads(archive.read(K8S_DEFS_IN_WHEEL))
        return data["$defs"], f"{K8S_WHEEL} wheel (PyPI): {K8S_DEFS_IN_WHEEL}"


# --- way 2: real CRD files ---

def build_from_crds(paths: list[Path], source: str) -> dict:
    kinds = {}
    for path in paths:
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or doc.get("kind") != "CustomResourceDefinition":
                continue
            kind = doc["spec"]["names"]["kind"]
            version = next(v for v in doc["spec"]["versions"] if v["name"] == "v1")
            kinds[kind] = trim(version["schema"]["openAPIV3Schema"])
    return {"format": 1, "kuberay_version": source, "source": {"crds": source}, "kinds": kinds,
            "definitions": {}}


def write(data: dict, path: Path = OUTPUT) -> None:
    text = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0,
                                                 filename="") as out:
        out.write(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k8s-defs", type=Path, help="Kubernetes _definitions.json ($defs)")
    parser.add_argument("--download", action="store_true",
                        help=f"pip-download {K8S_WHEEL} and read its {K8S_API} definitions")
    parser.add_argument("--crd", type=Path, action="append", default=[],
                        help="a real KubeRay CRD YAML (repeat for each kind)")
    parser.add_argument("--source", default="", help="with --crd: where the CRDs came from")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    if args.crd:
        data = build_from_crds(args.crd, args.source or ", ".join(map(str, args.crd)))
    else:
        defs, source = load_k8s_defs(args.k8s_defs, args.download)
        data = build_from_types(yaml.safe_load(TYPES_FILE.read_text()), defs, source)
    write(data, args.output)
    size = args.output.stat().st_size
    print(f"wrote {args.output} ({size:,} bytes): kinds {sorted(data['kinds'])}, "
          f"{len(data['definitions'])} Kubernetes definitions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
