"""Validation of JSON request bodies against small declarative specs.

Each spec lists its fields with a JSON type and whether they are required; a body with a missing, unknown or
mistyped field is refused with a message that names the field (``machine-config.vcpu_count``). The same specs
are checked against docs/api/vmm-openapi.json by the tests, so the document and the server cannot drift.
"""
import base64
import binascii
import dataclasses
import json
from dataclasses import dataclass, field

from vmm.api.errors import BadRequest
from vmm.config import MAX_VCPUS

JSON_TYPE_NAMES = {"integer": "an integer", "boolean": "a boolean", "string": "a string", "object": "an object",
                   "array": "an array"}


@dataclass(frozen=True)
class Field:
    json_type: str  # "integer" | "boolean" | "string" | "object" | "array"
    required: bool = False
    enum: tuple[str, ...] = ()
    minimum: int | None = None
    maximum: int | None = None
    spec: "ObjectSpec | None" = None  # for json_type "object"
    path: bool = False  # a file path: a NUL byte in it is refused (no file name holds one)
    items: "Field | None" = None  # for json_type "array": the rule every element follows


@dataclass(frozen=True)
class ObjectSpec:
    name: str  # used in error messages
    fields: dict[str, Field] = field(default_factory=dict)


def _type_ok(value, json_type: str) -> bool:
    if json_type == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if json_type == "boolean":
        return isinstance(value, bool)
    if json_type == "string":
        return isinstance(value, str)
    if json_type == "array":
        return isinstance(value, list)
    return isinstance(value, dict)


def check_object(value, spec: ObjectSpec, where: str = "") -> dict:
    where = where or spec.name
    if not isinstance(value, dict):
        raise BadRequest(f"{where}: the body must be a JSON object, not {type(value).__name__}")
    unknown = sorted(set(value) - set(spec.fields))
    if unknown:
        raise BadRequest(f"{where}: unknown field{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
                         f"(accepted: {', '.join(spec.fields)})")
    for name, rule in spec.fields.items():
        if name not in value:
            if rule.required:
                raise BadRequest(f"{where}: missing required field {name}")
            continue
        check_value(value[name], rule, f"{where}.{name}")
    return value


def check_value(item, rule: Field, where: str) -> None:
    if not _type_ok(item, rule.json_type):
        raise BadRequest(f"{where} must be {JSON_TYPE_NAMES[rule.json_type]}, not {json.dumps(item)}")
    if rule.path and "\0" in item:
        raise BadRequest(f"{where} {json.dumps(item)} contains a NUL byte: no file path can (refused)")
    if rule.enum and item not in rule.enum:
        raise BadRequest(f"{where} must be one of {', '.join(rule.enum)}, not {json.dumps(item)}")
    if rule.minimum is not None and item < rule.minimum:
        raise BadRequest(f"{where} must be at least {rule.minimum}, not {item}")
    if rule.maximum is not None and item > rule.maximum:
        raise BadRequest(f"{where} must be at most {rule.maximum}, not {item}")
    if rule.spec is not None:
        check_object(item, rule.spec, where)
    if rule.items is not None:
        for index, element in enumerate(item):
            check_value(element, rule.items, f"{where}[{index}]")


MAX_BODY_BYTES = 1 << 20  # as both HTTP readers' limit on a body (vmm.api.server.MAX_BODY, snapd.http_wire.MAX_BODY)
MAX_DEPTH = 32  # objects and arrays nested in a body (every spec here needs 3 at most)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_ONE_KIND = bytes.maketrans(b"{}", b"[]")


def nests_deeper_than(body: bytes, limit: int = MAX_DEPTH) -> bool:
    """Whether the JSON text nests objects and arrays more than ``limit`` deep (or leaves that many unclosed),
    decided before anything recursive reads it and without a Python loop over its bytes: escaped backslashes
    and quotes dropped (pairs from the left, as a JSON reader pairs them), every second run between quotes (the
    strings' contents) dropped, the brackets kept, then innermost pairs removed a level at a time; what is left
    after ``limit`` levels is too deep. Few brackets (the API's bodies) cost two counts."""
    if body.count(b"[") + body.count(b"{") <= limit:
        return False
    outside = b"".join(body.replace(b"\\\\", b"").replace(b'\\"', b"").split(b'"')[::2])
    brackets = outside.translate(_ONE_KIND, _NOT_BRACKETS)
    too_deep = b"[" * (limit + 1)
    for _ in range(limit):
        if not brackets:
            return False
        if too_deep in brackets:  # limit + 1 opened in a row (found at once, however deep it goes)
            return True
        inner = brackets.replace(b"[]", b"")
        if len(inner) == len(brackets):  # nothing closes: unbalanced, never valid JSON
            return True
        brackets = inner
    return bool(brackets)


def parse_body(body: bytes, spec: ObjectSpec) -> dict:
    if not body:
        raise BadRequest(f"{spec.name}: the request has no body (a JSON object is expected)")
    if len(body) > MAX_BODY_BYTES:
        raise BadRequest(f"{spec.name}: the body of {len(body)} bytes is larger than the {MAX_BODY_BYTES}-byte limit")
    if nests_deeper_than(body):
        raise BadRequest(f"{spec.name}: the body nests objects and arrays deeper than {MAX_DEPTH} levels (the limit), "
                         f"or leaves them unclosed")
    try:
        value = json.loads(body)
    except UnicodeDecodeError:
        raise BadRequest(f"{spec.name}: the body is not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise BadRequest(f"{spec.name}: the body is not valid JSON: {exc.msg} at line {exc.lineno} "
                         f"column {exc.colno}") from None
    except (ValueError, RecursionError) as exc:  # a number of more digits than Python converts (4300)
        raise BadRequest(f"{spec.name}: the body is not usable JSON: {str(exc).split(';')[0]}") from None
    return check_object(value, spec)


def decode_base64(text: str, where: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{where} is not valid base64") from None


# -- the request bodies of every endpoint (docs/api/vmm-openapi.json, components.schemas). Fields and ranges are
# Firecracker's (its API document, src/firecracker/swagger/firecracker.yaml); a value Firecracker takes but this
# VMM cannot honour passes here and is refused by the controller with "not supported by this VMM: ...".
CPU_TEMPLATES = ("C3", "T2", "T2S", "T2CL", "T2A", "V1N1", "None")  # Firecracker's static templates
MACHINE_CONFIG_FIELDS = {
    "vcpu_count": Field("integer", required=True, minimum=1, maximum=MAX_VCPUS),
    "mem_size_mib": Field("integer", required=True, minimum=2),
    "smt": Field("boolean"),
    "cpu_template": Field("string", enum=CPU_TEMPLATES),  # deprecated by Firecracker; only "None" is honoured
    "track_dirty_pages": Field("boolean"),
    "huge_pages": Field("string", enum=("None", "2M")),
}
MACHINE_CONFIG = ObjectSpec("machine-config", MACHINE_CONFIG_FIELDS)
MACHINE_CONFIG_PATCH = ObjectSpec("machine-config", {name: dataclasses.replace(f, required=False)
                                                     for name, f in MACHINE_CONFIG_FIELDS.items()})
BOOT_SOURCE = ObjectSpec("boot-source", {
    "kernel_image_path": Field("string", required=True, path=True),
    "boot_args": Field("string"),
    "initrd_path": Field("string", path=True),
})
INSTANCE_ACTION = ObjectSpec("actions", {
    "action_type": Field("string", required=True, enum=("InstanceStart", "SendCtrlAltDel", "FlushMetrics")),
})
VM_STATE = ObjectSpec("vm", {"state": Field("string", required=True, enum=("Paused", "Resumed"))})
INVOKE = ObjectSpec("invoke", {
    "payload": Field("string", required=True),
    "timeout_ms": Field("integer", minimum=1),
})
INVOCATION_WAIT = ObjectSpec("invocations.wait", {"timeout_ms": Field("integer", minimum=1)})
SNAPSHOT_CREATE = ObjectSpec("snapshot/create", {
    "snapshot_type": Field("string", enum=("Full", "Diff")),
    "snapshot_path": Field("string", required=True, path=True),
    "mem_file_path": Field("string", required=True, path=True),
})
MEMORY_BACKEND = ObjectSpec("mem_backend", {
    "backend_type": Field("string", required=True, enum=("File", "Uffd")),
    "backend_path": Field("string", required=True, path=True),
})
NETWORK_OVERRIDE = ObjectSpec("network_override", {
    "iface_id": Field("string", required=True),
    "host_dev_name": Field("string", required=True),
})
VSOCK_OVERRIDE = ObjectSpec("vsock_override", {
    "uds_path": Field("string", required=True, path=True),
})
SNAPSHOT_LOAD = ObjectSpec("snapshot/load", {
    "snapshot_path": Field("string", required=True, path=True),
    "mem_backend": Field("object", spec=MEMORY_BACKEND),
    "mem_file_path": Field("string", path=True),  # deprecated by Firecracker in favour of mem_backend
    "enable_diff_snapshots": Field("boolean"),  # deprecated by Firecracker: track_dirty_pages
    "track_dirty_pages": Field("boolean"),
    "resume_vm": Field("boolean"),
    # Honoured when they ask for nothing (this VMM has no network or vsock device, and its state files do not
    # record the host's wall clock); refused as not supported otherwise (VmmController.load_snapshot).
    "network_overrides": Field("array", items=Field("object", spec=NETWORK_OVERRIDE)),
    "vsock_override": Field("object", spec=VSOCK_OVERRIDE),
    "clock_realtime": Field("boolean"),
})
