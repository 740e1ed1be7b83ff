"""Ten JSON schemas that exercise structured output (nested objects, arrays with min/max items, enums, integer and
number ranges, required and optional fields, string patterns, anyOf); shared by the tests and the benchmarks."""

from __future__ import annotations

SHORT = {"type": "string", "maxLength": 8}

SCHEMAS: dict[str, dict] = {
    "person": {
        "type": "object",
        "properties": {"name": SHORT, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
        "required": ["name", "age"], "additionalProperties": False,
    },
    "nested_address": {
        "type": "object",
        "properties": {
            "name": SHORT,
            "address": {
                "type": "object",
                "properties": {"city": SHORT, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["city", "zip"], "additionalProperties": False,
            },
        },
        "required": ["name", "address"], "additionalProperties": False,
    },
    "tags_array": {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "minItems": 1,
                                "maxItems": 3}},
        "required": ["tags"], "additionalProperties": False,
    },
    "enums": {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]}, "size": {"enum": [1, 2, 3]},
                       "mode": {"type": "string", "enum": ["fast", "safe"]}},
        "required": ["color", "size", "mode"], "additionalProperties": False,
    },
    "number_ranges": {
        "type": "object",
        "properties": {"price": {"type": "number", "minimum": 0, "maximum": 1000},
                       "quantity": {"type": "integer", "exclusiveMinimum": 0, "maximum": 50},
                       "ratio": {"type": "number", "minimum": -1, "maximum": 1}},
        "required": ["price", "quantity", "ratio"], "additionalProperties": False,
    },
    "optional_fields": {
        "type": "object",
        "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 9999}, "note": SHORT,
                       "flag": {"type": "boolean"}},
        "required": ["id"], "additionalProperties": False,
    },
    "string_patterns": {
        "type": "object",
        "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
                       "hex": {"type": "string", "pattern": "^#[0-9a-f]{6}$"}},
        "required": ["code", "hex"], "additionalProperties": False,
    },
    "any_of": {
        "type": "object",
        "properties": {"value": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 99},
                                           {"type": "string", "maxLength": 5}, {"type": "null"}]}},
        "required": ["value"], "additionalProperties": False,
    },
    "array_of_objects": {
        "type": "object",
        "properties": {"points": {"type": "array", "minItems": 2, "maxItems": 4, "items": {
            "type": "object", "properties": {"x": {"type": "integer", "minimum": -9, "maximum": 9},
                                             "y": {"type": "integer", "minimum": -9, "maximum": 9}},
            "required": ["x", "y"], "additionalProperties": False}}},
        "required": ["points"], "additionalProperties": False,
    },
    "order": {
        "type": "object",
        "properties": {
            "order": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer", "minimum": 1, "maximum": 999},
                    "status": {"enum": ["new", "paid", "shipped"]},
                    "lines": {"type": "array", "minItems": 1, "maxItems": 2, "items": {
                        "type": "object",
                        "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{2}$"},
                                       "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
                        "required": ["sku", "qty"], "additionalProperties": False}},
                },
                "required": ["id", "status", "lines"], "additionalProperties": False,
            },
            "gift": {"type": "boolean"},
        },
        "required": ["order"], "additionalProperties": False,
    },
}
