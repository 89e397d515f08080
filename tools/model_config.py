"""Read a model's ``config.pbtxt`` and turn it into the JSON that Triton's repository ``load`` API takes, with
overrides (instance kind, parameters) — the way the main job, the router and tests place a model on a device."""

from __future__ import annotations

import json
from pathlib import Path


def _model_config_pb2():
    """tritonclient's generated ``ModelConfig`` message, loaded from its file: importing ``tritonclient.grpc``
    would pull in the whole gRPC client (and fail where only the protobufs are needed, e.g. without rapidjson)."""
    import importlib.util
    import sys

    name = "tritonmoe_model_config_pb2"
    if name not in sys.modules:
        root = importlib.util.find_spec("tritonclient")
        if root is None or not root.submodule_search_locations:
            raise ImportError("tritonclient is not installed (pip install tritonclient[all]==2.51.0)")
        path = Path(list(root.submodule_search_locations)[0]) / "grpc" / "model_config_pb2.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
    return sys.modules[name]


def read_config(model_dir: str | Path) -> dict:
    from google.protobuf import json_format, text_format

    model_config_pb2 = _model_config_pb2()
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
