"""Validates webhook payloads (a JSON array on stdin) against the documented JSON Schemas in
schemas/webhooks/, choosing the schema by the payload's `type`. Exits 1 naming the first
payload that does not conform."""

import json
import pathlib
import sys

import jsonschema

ROOT = pathlib.Path(__file__).resolve().parents[2] / "schemas" / "webhooks"
SCHEMAS = {
    "image.completed": "image-event.v1alpha1.json",
    "image.failed": "image-event.v1alpha1.json",
    "image_group.completed": "group-event.v1alpha2.json",
    "image_group.updated": "group-event.v1alpha2.json",
}

payloads = json.load(sys.stdin)
for payload in payloads:
    name = SCHEMAS.get(payload.get("type"))
    if name is None:
        sys.exit(f"unknown event type {payload.get('type')!r}")
    schema = json.loads((ROOT / name).read_text())
    try:
        jsonschema.validate(payload, schema, format_checker=jsonschema.FormatChecker())
    except jsonschema.ValidationError as error:
        sys.exit(f"{payload['type']} does not conform to {name}: {error.message} at {list(error.absolute_path)}")
print(f"{len(payloads)} payloads conform")
