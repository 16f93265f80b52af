"""YAML in and out, and the JSON Schema of the spec format."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from hybridlm.errors import SpecError
from hybridlm.layouts.registry import block_kinds, block_spec_class
from hybridlm.layouts.spec import ModelSpec


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML silently keeps the last one)."""


def _mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    out = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in out:
            mark = key_node.start_mark
            raise SpecError("", f"duplicate key {key!r} at line {mark.line + 1}, column {mark.column + 1}")
        out[key] = loader.construct_object(value_node, deep=deep)
    return out


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def spec_from_yaml(text: str, source: str = "<yaml>") -> ModelSpec:
    try:
        data = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise SpecError("", f"YAML syntax error in {source}{where}: {problem}") from None
    if data is None:
        raise SpecError("", f"{source} is empty")
    return ModelSpec.model_validate(data)


def load_spec(path: str | Path) -> ModelSpec:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise SpecError("", f"cannot read spec file {str(path)!r}: {err.strerror}") from None
    return spec_from_yaml(text, source=str(path))


def dump_spec(spec: ModelSpec, *, exclude_defaults: bool = True) -> str:
    return yaml.safe_dump(spec.to_dict(exclude_defaults=exclude_defaults), sort_keys=False,
                          default_flow_style=None, width=100)


def save_spec(spec: ModelSpec, path: str | Path) -> None:
    Path(path).write_text(dump_spec(spec))


def spec_json_schema() -> dict[str, Any]:
    """JSON Schema of the spec format, with one entry per registered block kind."""
    schema = copy.deepcopy(ModelSpec.model_json_schema())
    defs = schema.setdefault("$defs", {})
    defs.pop("BlockSpec", None)
    refs = {}
    for kind in block_kinds():
        cls = block_spec_class(kind)
        sub = cls.model_json_schema(ref_template="#/$defs/{model}")
        defs.update(sub.pop("$defs", {}))
        defs[cls.__name__] = sub
        refs[kind] = f"#/$defs/{cls.__name__}"
    schema["properties"]["blocks"]["additionalProperties"] = {
        "oneOf": [{"$ref": r} for r in refs.values()],
        "discriminator": {"propertyName": "kind", "mapping": refs},
    }
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema
