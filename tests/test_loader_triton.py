"""Through a real tritonserver: models whose weights come from a real loader service (config parameter
``loader_url``), loaded with Triton's repository API; a loader that is down fails the load clearly, nothing
half-loaded becomes READY, and the same load succeeds once the loader is back."""

from __future__ import annotations

import re
import shutil
import urllib.request
import uuid
from pathlib import Path

import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from conftest import PROMPTS, write_model
from test_loader_service import Loader
from tritonmoe.loader.convert import convert
from tritonmoe.tools.client import generate
from tritonmoe.tools.tritonserver import TritonServer

pytestmark = pytest.mark.e2e


def test_triton_loads_through_the_loader_and_survives_a_loader_restart(tmp_path, tiny, reference):
    converted = convert(tiny("qwen3_moe"), tmp_path / "qwen3-converted", progress=False).dest
    shm = Path("/dev/shm") / f"tritonmoe-test-{uuid.uuid4().hex[:8]}"
    loader = Loader(tmp_path / "loader", shm).start()
    repo = tmp_path / "repo"
    write_model(repo, "via_path", converted, loader_url=loader.client.url)
    loader.client.register("qwen3", converted)
    write_model(repo, "via_name", "qwen3", loader_url=loader.client.url, expert_cache_budget="50%")
    server = TritonServer(repo, models=["via_path"], log_path=tmp_path / "tritonserver.log")
    try:
        server.start(timeout=300)
        client = httpclient.InferenceServerClient(server.http_url, network_timeout=300)
        _, text = reference(tiny("qwen3_moe"), PROMPTS[1], 10)
        assert generate(server.http_url, "via_path", PROMPTS[1], max_tokens=10,
                        exclude_input_in_output=True)["text_output"] == text
        log = (tmp_path / "tritonserver.log").read_text()
        assert "through the loader" in log and "dram_fill" in log and "gpu_copy" in log  # phases are logged
        metrics = urllib.request.urlopen(server.metrics_url, timeout=5).read().decode()
        for phase in ("dram_fill", "index_read", "gpu_copy", "build", "tokenizer"):  # and exported
            assert re.search(rf'tritonmoe_startup_seconds{{[^}}]*model="via_path"[^}}]*phase="{phase}"[^}}]*}} '
                             r'[0-9.e+-]+', metrics) or re.search(
                rf'tritonmoe_startup_seconds{{[^}}]*phase="{phase}"[^}}]*model="via_path"[^}}]*}} [0-9.e+-]+',
                metrics), phase

        loader.kill()
        with pytest.raises(InferenceServerException, match="cannot reach the loader"):
            client.load_model("via_name")
        assert not client.is_model_ready("via_name")

        loader.start(same_port=True)  # same state: the registration and the DRAM copies are still there
        client.load_model("via_name")
        assert client.is_model_ready("via_name")
        assert generate(server.http_url, "via_name", PROMPTS[1], max_tokens=10,
                        exclude_input_in_output=True)["text_output"] == text
        statuses = {m["name"]: m for m in loader.client.status()["models"]}
        assert statuses["qwen3"]["tier"] == "dram" and statuses["qwen3"]["dram_fills"] == 1
        client.close()
    finally:
        server.stop()
        loader.stop()
        shutil.rmtree(shm, ignore_errors=True)
