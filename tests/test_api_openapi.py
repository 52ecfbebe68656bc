"""docs/api/vmm-openapi.json against the server: same routes, same request fields, responses that validate.

The validator covers the subset of JSON Schema the document uses ($ref, type, properties, required,
additionalProperties: false, enum, minimum, items, format: byte), so no dependency is needed.
"""
import base64
import binascii
import json
import os
import subprocess

import pytest

from tests.conftest import ROOT, requires_kvm
from vmm.api import fields
from vmm.api.client import ApiClient, VmmProcess
from vmm.api.server import ROUTES

DOC_PATH = os.path.join(ROOT, "docs", "api", "vmm-openapi.json")
METHODS = ("get", "put", "patch", "post", "delete")
JSON_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool}


@pytest.fixture(scope="module")
def doc():
    with open(DOC_PATH) as f:
        return json.load(f)


def node_path(ref: str):
    assert ref.startswith("#/"), ref
    return ref[2:].split("/")


def deref(doc, node):
    while "$ref" in node:
        target = doc
        for part in node_path(node["$ref"]):
            target = target[part]
        node = target
    return node


def schema_errors(doc, value, schema, where="$") -> list[str]:
    schema = deref(doc, schema)
    kind = schema.get("type")
    if kind == "integer":
        if not isinstance(value, int) or isinstance(value, bool):
            return [f"{where}: {value!r} is not an integer"]
    elif kind == "number":
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return [f"{where}: {value!r} is not a number"]
    elif kind is not None and not isinstance(value, JSON_TYPES[kind]):
        return [f"{where}: {value!r} is not of type {kind}"]
    errors = []
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{where}: {value!r} is not one of {schema['enum']}")
    if "minimum" in schema and value < schema["minimum"]:
        errors.append(f"{where}: {value!r} is below {schema['minimum']}")
    if "maximum" in schema and value > schema["maximum"]:
        errors.append(f"{where}: {value!r} is above {schema['maximum']}")
    if schema.get("format") == "byte":
        try:
            base64.b64decode(value, validate=True)
        except binascii.Error:
            errors.append(f"{where}: {value!r} is not base64")
    if kind == "object":
        properties = schema.get("properties", {})
        errors += [f"{where}: missing {name}" for name in schema.get("required", []) if name not in value]
        if schema.get("additionalProperties") is False:
            errors += [f"{where}: undocumented field {name}" for name in value if name not in properties]
        for name, item in value.items():
            if name in properties:
                errors += schema_errors(doc, item, properties[name], f"{where}.{name}")
    if kind == "array":
        for i, item in enumerate(value):
            errors += schema_errors(doc, item, schema["items"], f"{where}[{i}]")
    return errors


def documented_operations(doc) -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, item in doc["paths"].items() for method in item if method in METHODS}


def test_every_served_route_is_documented_and_every_documented_one_served(doc):
    served = {(route.method, route.path) for route in ROUTES}
    assert served == documented_operations(doc)


def test_validator_rejects_what_the_document_forbids(doc):
    info = {"$ref": "#/components/schemas/InstanceInfo"}
    good = {"id": "a", "state": "Paused", "vmm_version": "1", "app_name": "vmm"}
    assert schema_errors(doc, good, info) == []
    assert schema_errors(doc, {**good, "state": "Stopped"}, info)
    assert schema_errors(doc, {**good, "extra": 1}, info)
    assert schema_errors(doc, {k: v for k, v in good.items() if k != "id"}, info)
    reply = {"$ref": "#/components/schemas/InvocationReply"}
    assert schema_errors(doc, {"result": "not base64!", "seq": 1, "latency_us": 1.5}, reply)
    assert schema_errors(doc, {"result": "", "seq": True, "latency_us": 1.5}, reply)


def test_request_schemas_match_the_fields_the_server_accepts(doc):
    for route in ROUTES:
        operation = doc["paths"][route.path][route.method.lower()]
        if route.body is None:
            assert "requestBody" not in operation, route
            continue
        check_spec(doc, operation["requestBody"]["content"]["application/json"]["schema"], route.body, route.path)


def check_spec(doc, schema, spec: fields.ObjectSpec, where: str) -> None:
    schema = deref(doc, schema)
    assert schema["type"] == "object" and schema.get("additionalProperties") is False, where
    assert set(schema["properties"]) == set(spec.fields), where
    assert set(schema.get("required", [])) == {n for n, f in spec.fields.items() if f.required}, where
    for name, rule in spec.fields.items():
        prop = deref(doc, schema["properties"][name])
        assert prop["type"] == rule.json_type, f"{where}.{name}"
        assert tuple(prop.get("enum", ())) == rule.enum, f"{where}.{name}"
        assert prop.get("minimum") == rule.minimum, f"{where}.{name}"
        assert prop.get("maximum") == rule.maximum, f"{where}.{name}"
        if rule.spec is not None:
            check_spec(doc, prop, rule.spec, f"{where}.{name}")


class CheckedClient:
    """Sends requests and validates every reply against the operation's documented response."""

    def __init__(self, doc, client: ApiClient):
        self.doc, self.client, self.covered = doc, client, set()

    def __call__(self, method: str, path: str, template: str | None = None, body=None, expect: int = None):
        template = template or path
        reply = self.client.request(method, path, body)
        operation = self.doc["paths"][template][method.lower()]
        response = operation["responses"].get(str(reply.status)) or operation["responses"]["default"]
        response = deref(self.doc, response)
        if reply.status == 204:
            assert not reply.body and "content" not in response
        else:
            schema = response["content"]["application/json"]["schema"]
            errors = schema_errors(self.doc, reply.json(), schema)
            assert not errors, (method, path, reply.status, errors)
        if expect is not None:
            assert reply.status == expect, (method, path, reply.status, reply.body)
        self.covered.add((method, template))
        return reply.json()


@requires_kvm
def test_every_operation_answers_as_documented(doc, tmp_path):
    snap, mem = str(tmp_path / "vm.snap"), str(tmp_path / "vm.mem")
    payload = base64.b64encode(b"openapi").decode()
    covered = set()
    with VmmProcess(str(tmp_path / "a.sock"), stdout=subprocess.DEVNULL) as source:
        api = CheckedClient(doc, source.client)
        api("GET", "/", expect=200)
        api("GET", "/machine-config", expect=200)
        api("PATCH", "/machine-config", body={"mem_size_mib": 64}, expect=204)
        api("PUT", "/machine-config", body={"vcpu_count": 1, "mem_size_mib": 128}, expect=204)
        api("PUT", "/boot-source", body={"kernel_image_path": os.path.join(ROOT, "vmm", "guest", "guest.elf"),
                                         "boot_args": "workload=hello"}, expect=204)
        api("GET", "/vm/config", expect=200)
        api("PUT", "/invoke", body={"payload": payload}, expect=400)  # not started
        api("PUT", "/actions", body={"action_type": "InstanceStart"}, expect=204)
        api("PUT", "/invoke", body={"payload": payload, "timeout_ms": 5000}, expect=200)
        api("PATCH", "/vm", body={"state": "Paused"}, expect=204)
        api("PUT", "/invoke", body={"payload": payload, "timeout_ms": 1}, expect=504)
        api("GET", "/invocations", expect=200)
        api("PUT", "/snapshot/create", body={"snapshot_path": snap, "mem_file_path": mem}, expect=204)
        api("PATCH", "/vm", body={"state": "Resumed"}, expect=204)
        api("PUT", "/invocations/2/wait", "/invocations/{seq}/wait", body={"timeout_ms": 5000}, expect=200)
        api("PUT", "/invocations/7/wait", "/invocations/{seq}/wait", body={}, expect=404)
        api("PUT", "/snapshot/load", body={"snapshot_path": snap, "mem_file_path": mem}, expect=400)
        api("GET", "/", expect=200)
        covered |= api.covered
    with VmmProcess(str(tmp_path / "b.sock"), stdout=subprocess.DEVNULL) as restored:
        api = CheckedClient(doc, restored.client)
        api("PUT", "/snapshot/load", body={"snapshot_path": snap, "resume_vm": True,
                                           "mem_backend": {"backend_type": "File", "backend_path": mem}}, expect=204)
        api("GET", "/invocations", expect=200)
        api("PUT", "/invocations/2/wait", "/invocations/{seq}/wait", body={"timeout_ms": 5000}, expect=200)
        api("GET", "/machine-config", expect=200)
        covered |= api.covered
    assert covered == documented_operations(doc)
