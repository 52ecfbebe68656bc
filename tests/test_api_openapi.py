"""docs/api/vmm-openapi.json against the server: same routes, same request fields, responses that validate.

The validator (tests/openapi_helpers.py) covers the subset of JSON Schema the document uses, so no dependency
is needed.
"""
import base64
import json
import os
import subprocess

import pytest

from tests.conftest import ROOT, requires_kvm
from tests.openapi_helpers import CheckedClient, check_spec, documented_operations, schema_errors
from vmm.api.client import VmmProcess
from vmm.api.server import ROUTES

DOC_PATH = os.path.join(ROOT, "docs", "api", "vmm-openapi.json")


@pytest.fixture(scope="module")
def doc():
    with open(DOC_PATH) as f:
        return json.load(f)


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


@requires_kvm
def test_every_operation_answers_as_documented(doc, tmp_path):
    snap, mem = str(tmp_path / "vm.snap"), str(tmp_path / "vm.mem")
    payload = base64.b64encode(b"openapi").decode()
    covered = set()
    with VmmProcess(str(tmp_path / "a.sock"), stdout=subprocess.DEVNULL) as source:
        api = CheckedClient(doc, source.client)
        api("GET", "/", expect=200)
        api("GET", "/version", expect=200)
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
