"""The scenario's JSON Schema, for editors (``simmoe schema``; shipped as
``docs/scenario.schema.json``).

Generated from the pydantic models of :mod:`simulator.scenario`, then completed with what their
validators accept beyond the models' fields: a model given as a preset name or as
``{preset: NAME, ...overrides}``, a policy's ``miss`` given as a kind name, and the known names
of generators, load modes and cache, prefetch and miss policies. The schema helps an editor
complete and check keys; ``simmoe run`` checks more (bounds that tie two fields together, a
policy's options).
"""
from __future__ import annotations

import copy
import json

from .models import PRESETS
from .policies import EVICTION_POLICIES, LOAD_MODES, MISS_POLICIES, PREFETCH_POLICIES
from .policies.placement import PLACEMENT_POLICIES
from .scenario import Scenario
from .traces.synthetic import GENERATORS

SCHEMA_ID = "https://simmoe.invalid/scenario.schema.json"


def _names(table) -> list[str]:
    return sorted(table)


def scenario_schema() -> dict:
    """The JSON Schema (draft 2020-12) of a scenario YAML file."""
    s = Scenario.model_json_schema()
    defs = s["$defs"]
    presets = {"type": "string", "enum": _names(PRESETS), "description": "a model preset (simmoe models)"}
    overrides = copy.deepcopy(defs["ModelSpec"])
    overrides["properties"] = {"preset": presets, **overrides["properties"]}
    overrides["required"] = ["preset"]
    overrides["description"] = "a model preset with some fields overridden"
    s["properties"]["model"] = {"anyOf": [presets, overrides, {"$ref": "#/$defs/ModelSpec"}]}
    for spec, table in (("CacheSpec", EVICTION_POLICIES), ("PrefetchSpec", PREFETCH_POLICIES),
                        ("MissSpec", MISS_POLICIES)):
        defs[spec]["properties"]["kind"]["enum"] = _names(table)
    defs["PolicySpec"]["properties"]["load"]["enum"] = _names(LOAD_MODES)
    defs["GpusSpec"]["properties"]["placement"]["enum"] = _names(PLACEMENT_POLICIES)
    defs["PolicySpec"]["properties"]["miss"] = {
        "anyOf": [{"type": "string", "enum": _names(MISS_POLICIES)}, {"$ref": "#/$defs/MissSpec"}]}
    defs["TraceSpec"]["properties"]["generator"]["anyOf"] = [
        {"type": "string", "enum": _names(GENERATORS)}, {"type": "null"}]
    defs["CacheSpec"]["properties"]["capacity"]["anyOf"] = [
        {"type": "integer", "exclusiveMinimum": 0},
        {"type": "string", "pattern": r"^\s*\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)\s*$"}, {"type": "null"}]
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": SCHEMA_ID,
            "description": "A simmoe scenario (docs/scenarios.md).", **s}


def schema_text() -> str:
    return json.dumps(scenario_schema(), indent=1, sort_keys=True) + "\n"
