"""Structured-output cases for tests/test_structured_outputs.py: JSON schemas of the kinds users write, a few
regexes, choice lists and grammars (one Lark, one GBNF), each under a short name.

Every entry of SCHEMAS is accepted by llguidance (`LLMatcher.validate_grammar_with_warnings` reports no error for
`LLMatcher.grammar_from_json_schema(schema)`); UNSUPPORTED holds schemas llguidance refuses (an unimplemented
keyword or an unknown format), which the engine must refuse too. Strings are mostly bounded (maxLength <= ~20)
and arrays have maxItems <= 4, so a tiny random model can finish within the tests' token budget.

FORMATS names the `format` values used here that llguidance enforces (the syntax, not the calendar: see the
test's format checker).
"""
from __future__ import annotations

S20 = {"type": "string", "maxLength": 20}
S12 = {"type": "string", "maxLength": 12}


def obj(props: dict, required: list[str] | None = None, additional: bool | dict = False, **kw) -> dict:
    """An object schema; every property required unless `required` says which."""
    return {"type": "object", "properties": props,
            "required": list(props) if required is None else required, "additionalProperties": additional, **kw}


SCHEMAS: dict[str, dict] = {
    # -- scalars ------------------------------------------------------------------------------------------------
    "bool": {"type": "boolean"},
    "null": {"type": "null"},
    "int_bounds": {"type": "integer", "minimum": -50, "maximum": 50},
    "int_exclusive": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 10},
    "int_multiple": {"type": "integer", "minimum": 0, "maximum": 100, "multipleOf": 5},
    "int_enum": {"type": "integer", "enum": [1, 2, 3, 5, 8]},
    "num_bounds": {"type": "number", "minimum": -10.5, "maximum": 99.25},
    "num_exclusive": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
    "str_len": {"type": "string", "minLength": 3, "maxLength": 8},
    "str_fixed_len": {"type": "string", "minLength": 4, "maxLength": 4},
    "str_enum": {"type": "string", "enum": ["red", "green", "blue"]},
    "str_enum_unicode": {"enum": ["café", "東京", "naïve", "Straße"]},
    "enum_mixed": {"enum": [1, "two", None, True, 4.5]},
    "const_str": {"const": "v1"},
    "nullable_str": {"type": ["string", "null"], "maxLength": 10},
    "int_or_bool": {"type": ["integer", "boolean"], "minimum": 0, "maximum": 9},
    # -- string patterns and formats ---------------------------------------------------------------------------
    "pattern_sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
    "pattern_hex_color": {"type": "string", "pattern": "^#[0-9a-f]{6}$"},
    "pattern_semver": {"type": "string", "pattern": "^[0-9]{1,2}\\.[0-9]{1,2}\\.[0-9]{1,3}$"},
    "pattern_bounded": {"type": "string", "pattern": "^[a-z]+$", "maxLength": 10},
    "fmt_date": {"type": "string", "format": "date"},
    "fmt_date_time": {"type": "string", "format": "date-time"},
    "fmt_time": {"type": "string", "format": "time"},
    "fmt_email": {"type": "string", "format": "email", "maxLength": 30},
    "fmt_uuid": {"type": "string", "format": "uuid"},
    "fmt_ipv4": {"type": "string", "format": "ipv4"},
    "fmt_ipv6": obj({"addr": {"type": "string", "format": "ipv6"}}),
    "fmt_hostname": {"type": "string", "format": "hostname", "maxLength": 20},
    # -- arrays -------------------------------------------------------------------------------------------------
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "minItems": 1, "maxItems": 4},
    "int_list": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999}, "maxItems": 4},
    "num_pair": {"type": "array", "items": {"type": "number", "minimum": -1, "maximum": 1}, "minItems": 2,
                 "maxItems": 2},
    "enum_pair": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 2, "maxItems": 2},
    "tuple": {"type": "array", "prefixItems": [{"type": "integer", "minimum": 0, "maximum": 9}, S12,
                                               {"type": "boolean"}], "items": False, "minItems": 3},
    "matrix_2x2": {"type": "array", "minItems": 2, "maxItems": 2,
                   "items": {"type": "array", "minItems": 2, "maxItems": 2,
                             "items": {"type": "integer", "minimum": 0, "maximum": 9}}},
    "objects_list": {"type": "array", "maxItems": 3,
                     "items": obj({"id": {"type": "integer", "minimum": 1, "maximum": 99}, "name": S12})},
    # -- objects ------------------------------------------------------------------------------------------------
    "empty_object": {"type": "object", "properties": {}, "additionalProperties": False},
    "person": obj({"name": S20, "age": {"type": "integer", "minimum": 0, "maximum": 120}}),
    "optional_fields": obj({"a": {"type": "integer", "minimum": 0, "maximum": 9}, "b": S12, "c": {"type": "boolean"}},
                           required=["a"]),
    "all_optional": obj({"x": {"type": "boolean"}, "y": {"type": "null"}}, required=[]),
    "const_field": obj({"version": {"const": 2}, "kind": {"const": "point"}, "x": {"type": "integer",
                                                                                   "minimum": 0, "maximum": 9}}),
    "nested_address": obj({"name": S20, "address": obj({
        "street": S20, "city": S12, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}})}),
    "nested_3_levels": obj({"a": obj({"b": obj({"c": {"type": "integer", "minimum": 0, "maximum": 9}})})}),
    "nullable_fields": obj({"nickname": {"type": ["string", "null"], "maxLength": 10},
                            "score": {"type": ["number", "null"], "minimum": 0, "maximum": 10}}),
    "flags": obj({"active": {"type": "boolean"}, "admin": {"type": "boolean"}, "verified": {"type": "boolean"}}),
    "dict_of_ints": {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0, "maximum": 99},
                     "maxProperties": 3},
    "pattern_props": {"type": "object", "patternProperties": {"^x[0-9]$": {"type": "integer", "minimum": 0,
                                                                           "maximum": 9}},
                      "additionalProperties": False, "maxProperties": 3},
    "date_range": obj({"start": {"type": "string", "format": "date"}, "end": {"type": "string", "format": "date"}}),
    "geo_point": obj({"lat": {"type": "number", "minimum": -90, "maximum": 90},
                      "lon": {"type": "number", "minimum": -180, "maximum": 180}}),
    "annotated": {"title": "Answer", "description": "annotations only", "type": "object",
                  "properties": {"answer": {"type": "string", "maxLength": 15, "description": "the answer",
                                            "examples": ["42"]}},
                  "required": ["answer"], "additionalProperties": False},
    # -- combinators and references -----------------------------------------------------------------------------
    "anyof_str_int": {"anyOf": [S12, {"type": "integer", "minimum": 0, "maximum": 1000}]},
    "oneof_shapes": {"oneOf": [
        obj({"kind": {"const": "circle"}, "radius": {"type": "number", "minimum": 0, "maximum": 10}}),
        obj({"kind": {"const": "square"}, "side": {"type": "integer", "minimum": 1, "maximum": 10}})]},
    "allof_merge": {"allOf": [{"type": "object", "properties": {"a": {"type": "integer", "minimum": 0,
                                                                      "maximum": 9}}, "required": ["a"]},
                              {"properties": {"b": {"type": "boolean"}}, "required": ["b"]}],
                    "properties": {"a": True, "b": True}, "additionalProperties": False},
    "ref_defs": {"$defs": {"point": obj({"x": {"type": "integer", "minimum": -9, "maximum": 9},
                                         "y": {"type": "integer", "minimum": -9, "maximum": 9}})},
                 "type": "object", "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}},
                 "required": ["start", "end"], "additionalProperties": False},
    "recursive_tree": {"$defs": {"node": obj({"v": {"type": "integer", "minimum": 0, "maximum": 9},
                                              "kids": {"type": "array", "maxItems": 2,
                                                       "items": {"$ref": "#/$defs/node"}}})},
                       "$ref": "#/$defs/node"},
    "recursive_list": {"$defs": {"cell": obj({"v": {"type": "integer", "minimum": 0, "maximum": 9},
                                              "next": {"anyOf": [{"$ref": "#/$defs/cell"}, {"type": "null"}]}})},
                       "$ref": "#/$defs/cell"},
    # -- extraction-like records (10 fields) --------------------------------------------------------------------
    "invoice": obj({
        "invoice_no": {"type": "string", "pattern": "^INV-[0-9]{4}$"},
        "date": {"type": "string", "format": "date"},
        "customer": S20,
        "email": {"type": ["string", "null"], "format": "email", "maxLength": 30},
        "currency": {"enum": ["USD", "EUR", "GBP"]},
        "subtotal": {"type": "number", "minimum": 0, "maximum": 10000},
        "tax": {"type": "number", "minimum": 0, "maximum": 1000},
        "paid": {"type": "boolean"},
        "lines": {"type": "array", "maxItems": 2, "items": obj({
            "sku": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{2}$"},
            "qty": {"type": "integer", "minimum": 1, "maximum": 9}})},
        "notes": {"type": ["string", "null"], "maxLength": 15}}),
    "person_record": obj({
        "first_name": S12, "last_name": S12, "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "email": {"type": "string", "format": "email", "maxLength": 30},
        "phone": {"type": "string", "pattern": "^\\+[0-9]{2} [0-9]{3} [0-9]{4}$"},
        "birthday": {"type": "string", "format": "date"}, "city": S12,
        "country": {"type": "string", "enum": ["US", "DE", "FR", "JP"]},
        "employed": {"type": "boolean"}, "height_m": {"type": "number", "minimum": 0.5, "maximum": 2.5}}),
    "event_record": obj({
        "id": {"type": "string", "format": "uuid"}, "title": S20,
        "starts": {"type": "string", "format": "date-time"},
        "duration_min": {"type": "integer", "minimum": 5, "maximum": 600},
        "location": {"anyOf": [S20, {"type": "null"}]}, "online": {"type": "boolean"},
        "attendees": {"type": "array", "items": S12, "maxItems": 3},
        "priority": {"enum": ["low", "normal", "high"]},
        "organizer": obj({"name": S12, "ip": {"type": "string", "format": "ipv4"}}),
        "reminder": {"type": ["integer", "null"], "minimum": 0, "maximum": 60}}),
    "order": obj({"order_id": {"type": "integer", "minimum": 1, "maximum": 99999},
                  "items": {"type": "array", "minItems": 1, "maxItems": 3, "items": obj({
                      "sku": {"type": "string", "pattern": "^[A-Z]{3}[0-9]{2}$"},
                      "qty": {"type": "integer", "minimum": 1, "maximum": 10},
                      "price": {"type": "number", "exclusiveMinimum": 0, "maximum": 1000}})},
                  "status": {"enum": ["new", "shipped", "delivered"]}}),
    "entities": obj({"entities": {"type": "array", "maxItems": 4, "items": obj({
        "text": {"type": "string", "minLength": 1, "maxLength": 15},
        "type": {"enum": ["PER", "ORG", "LOC", "MISC"]}})}}),
    "product": obj({"name": S20, "price": {"type": "number", "exclusiveMinimum": 0, "maximum": 500},
                    "in_stock": {"type": "boolean"},
                    "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3}}),
    "key_values": {"type": "array", "maxItems": 4, "items": obj({
        "key": {"type": "string", "pattern": "^[a-z]{1,8}$"},
        "value": {"anyOf": [S12, {"type": "integer", "minimum": -99, "maximum": 99}, {"type": "boolean"},
                            {"type": "null"}]}})},
    # -- classification-like ------------------------------------------------------------------------------------
    "classify": obj({"label": {"enum": ["positive", "negative", "neutral"]},
                     "confidence": {"type": "number", "minimum": 0, "maximum": 1}}),
    "multi_label": obj({"labels": {"type": "array", "items": {"enum": ["spam", "ads", "news", "sport"]},
                                   "minItems": 1, "maxItems": 3},
                        "score": {"type": "number", "minimum": 0, "maximum": 1}}),
    "yes_no_reason": obj({"answer": {"type": "boolean"}, "reason": S20}),
    "rating": obj({"stars": {"type": "integer", "minimum": 1, "maximum": 5}, "comment": {"type": "string",
                                                                                          "maxLength": 20}}),
    "translation": obj({"source": {"enum": ["en", "de", "fr"]}, "target": {"enum": ["en", "de", "fr"]},
                        "text": S20}),
    "intent": obj({"intent": {"enum": ["book", "cancel", "ask", "other"]},
                   "slots": obj({"date": {"type": ["string", "null"], "format": "date"},
                                 "count": {"type": ["integer", "null"], "minimum": 1, "maximum": 9}})}),
}

# Formats llguidance enforces, by name (the test checks them: syntax only).
FORMATS = ("date", "date-time", "time", "email", "uuid", "ipv4", "ipv6", "hostname")

# JSON Schema features llguidance refuses (validate_grammar_with_warnings reports an error): the engine must
# refuse such a request with a message, not run it unconstrained.
UNSUPPORTED: dict[str, dict] = {
    "unique_items": {"type": "array", "items": {"type": "integer"}, "uniqueItems": True},
    "not": {"not": {"type": "string"}},
    "contains": {"type": "array", "contains": {"type": "integer"}},
    "if_then": {"if": {"type": "string"}, "then": {"maxLength": 3}},
    "dependent_required": {"type": "object", "dependentRequired": {"a": ["b"]}},
    "property_names": {"type": "object", "propertyNames": {"pattern": "^[a-z]+$"}},
    "fmt_idn_email": {"type": "string", "format": "idn-email"},
    "fmt_uri_reference": {"type": "string", "format": "uri-reference"},
    "bad_type": {"type": "strin"},
    "bad_pattern": {"type": "string", "pattern": "[a-"},
}
# what the refusal of each names (a fragment of llguidance's message)
UNSUPPORTED_WHY: dict[str, str] = {
    "unique_items": "uniqueItems", "not": '["not"]', "contains": "contains", "if_then": '"if"',
    "dependent_required": "dependentRequired", "property_names": "propertyNames", "fmt_idn_email": "idn-email",
    "fmt_uri_reference": "uri-reference", "bad_type": "strin", "bad_pattern": "unclosed character class",
}

REGEXES: dict[str, str] = {
    "phone": r"\+1-[0-9]{3}-[0-9]{3}-[0-9]{4}",
    "date": r"[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])",
    "id": r"[A-Z]{2}[0-9]{6}",
    "word": r"[a-z]{3,10}",
    "yes_no": r"(yes|no)",
    "ipv4ish": r"([0-9]{1,3}\.){3}[0-9]{1,3}",
}

CHOICES: dict[str, list[str]] = {
    "yes_no": ["yes", "no"],
    "sentiment": ["positive", "negative", "neutral"],
    "letters": ["A", "B", "C", "D"],
    "prefixes": ["a", "ab", "abc"],  # every choice a prefix of the next: the grammar may end or go on
    "unicode": ["café", "東京", "naïve"],
}

# Lark (as llguidance reads it): arithmetic over small integers; no whitespace.
LARK_ARITH = r"""
start: expr
expr: term (("+" | "-") term)*
term: factor (("*" | "/") factor)*
factor: NUMBER | "(" expr ")"
NUMBER: /[0-9]{1,3}/
"""

# Lark: a key=value list.
LARK_KV = r"""
start: pair (";" pair)*
pair: KEY "=" VALUE
KEY: /[a-z]{1,8}/
VALUE: /[0-9]{1,4}/
"""

# GBNF (llama.cpp's): one to four "name:count" items.
GBNF_ITEMS = r"""
root ::= item ("," item){0,3}
item ::= [a-z]{1,5} ":" [0-9]{1,3}
"""

GRAMMARS: dict[str, str] = {"lark_arith": LARK_ARITH, "lark_kv": LARK_KV, "gbnf_items": GBNF_ITEMS}
