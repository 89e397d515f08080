"""Read a model's ``config.pbtxt`` and turn it into the JSON that Triton's repository ``load`` API takes, with
overrides (instance kind, parameters) — the way the main job, the router and tests place a model on a device."""

from __future__ import annotations

import json
from pathlib import Path


def read_config(model_dir: str | Path) -> dict:
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    text = (Path(model_dir) / "config.pbtxt").read_text()
    message = text_format.Parse(text, model_config_pb2.ModelConfig())
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def with_overrides(config: dict, *, parameters: dict[str, str] | None = None, kind: str | None = None,
                   gpus: list[int] | None = None, count: int | None = None) -> dict:
    """A copy of ``config`` with some parameters replaced and one instance group of ``kind`` (KIND_CPU/KIND_GPU)."""
    config = json.loads(json.dumps(config))
    for key, value in (parameters or {}).items():
        config.setdefault("parameters", {})[key] = {"string_value": str(value)}
    if kind or gpus is not None or count is not None:
        group = dict((config.get("instance_group") or [{}])[0])
        group.pop("name", None)
        if kind:
            group["kind"] = kind
        if gpus is not None:
            group["gpus"] = gpus
        if count is not None:
            group["count"] = count
        if group.get("kind") != "KIND_GPU":
            group.pop("gpus", None)
        config["instance_group"] = [group]
    return config
