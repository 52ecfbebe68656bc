"""A validator for the subset of JSON Schema the project's OpenAPI documents use ($ref, type, properties,
required, additionalProperties: false, enum, minimum, maximum, items, format: byte), shared by the tests that
hold the VMM's and the daemon's servers to docs/api/*.json."""
import base64
import binascii

from vmm.api import fields
from vmm.api.client import ApiClient

METHODS = ("get", "put", "patch", "post", "delete")
JSON_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool}


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
        if rule.items is not None:  # an array: its elements' schema against the rule every element follows
            items = deref(doc, prop["items"])
            assert items["type"] == rule.items.json_type, f"{where}.{name}[]"
            if rule.items.spec is not None:
                check_spec(doc, items, rule.items.spec, f"{where}.{name}[]")


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
