"""Run NVIDIA's ``genai-perf`` (the LLM benchmark that drives ``perf_analyzer``) against a tritonmoe model.

genai-perf brings packages of its own (pandas, optuna, plotly, statsmodels, ...) that the serving environment does
not need, so ``scripts/dev.sh install`` puts it in a folder of its own (``.venv/genai-perf``, or
``$TRITONMOE_GENAI_PERF``) and this module runs it from there, with ``tritonclient``'s ``perf_analyzer`` on
``PATH`` and the libraries that binary links found (see :mod:`tritonmoe.tools.perf_analyzer`).

Our Triton models speak the vLLM backend's I/O, so genai-perf's ``--backend vllm --endpoint-type kserve`` works as
is; the tokenizer is the served checkpoint's folder (no download)::

    python -m tritonmoe.tools.genai_perf profile -m tiny_moe --backend vllm --endpoint-type kserve --streaming \\
        -u 127.0.0.1:8001 --tokenizer ~/.cache/tritonmoe/models/tiny-mixtral \\
        --synthetic-input-tokens-mean 128 --output-tokens-mean 64 --concurrency 4 --request-count 50

The router's OpenAI-compatible API works the same way (``--endpoint-type completions`` or ``chat``, ``-u`` its
HTTP address, ``--header "Authorization:Bearer TOKEN"`` when it wants a token).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from . import perf_analyzer
from .tritonserver import TritonError

VERSION = "0.0.16"  # what scripts/dev.sh installs


def home() -> Path:
    return Path(os.environ.get("TRITONMOE_GENAI_PERF") or Path(sys.prefix) / "genai-perf")


def env() -> dict:
    site = home()
    if not (site / "genai_perf").is_dir():
        raise TritonError(f"genai-perf is not installed in {site}: run `scripts/dev.sh install` (or pip install "
                          f"--target {site} genai-perf=={VERSION} 'numpy<2')")
    e = perf_analyzer.env()
    e["PATH"] = os.pathsep.join([str(perf_analyzer.binary().parent), e.get("PATH", "")])
    e["PYTHONPATH"] = os.pathsep.join([str(site), e.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    e.setdefault("HF_HUB_OFFLINE", "1")  # tokenizers come from local folders; never reach for the hub
    return e


def _command(args: list[str]) -> list[str]:
    return [sys.executable, "-c", "import sys; from genai_perf.main import main; sys.exit(main())", *args]


def run(args: list[str], cwd: str | Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(_command(args), env=env(), cwd=cwd, capture_output=True, text=True, timeout=timeout)


def profile(model: str, url: str, tokenizer: str | Path, artifacts: str | Path, *, input_tokens: int = 32,
            output_tokens: int = 16, requests: int = 20, concurrency: int = 2, streaming: bool = True,
            endpoint: str = "kserve", headers: dict[str, str] | None = None,
            timeout: float = 600) -> tuple[dict, dict]:
    """One ``genai-perf profile`` run; returns (its summary JSON, perf_analyzer's per-request export).

    ``endpoint``: ``kserve`` (a tritonserver's gRPC ``url``, our models' vLLM-style I/O) or ``completions`` /
    ``chat`` (an OpenAI-compatible HTTP ``url``, e.g. the router's; greedy, ``ignore_eos`` so every request
    generates ``output_tokens``). ``headers``: extra HTTP headers (the router's bearer token)."""
    artifacts = Path(artifacts)
    args = ["profile", "-m", model, "--endpoint-type", endpoint, "-u", url,
            "--tokenizer", str(tokenizer), "--synthetic-input-tokens-mean", str(input_tokens),
            "--synthetic-input-tokens-stddev", "0", "--output-tokens-mean", str(output_tokens),
            "--request-count", str(requests), "--concurrency", str(concurrency),
            "--artifact-dir", str(artifacts), *(["--streaming"] if streaming else [])]
    if endpoint == "kserve":
        args += ["--backend", "vllm"]
    else:
        args += ["--extra-inputs", f"max_tokens:{output_tokens}", "--extra-inputs", "ignore_eos:true"]
    for key, value in (headers or {}).items():
        args += ["--header", f"{key}:{value}"]
    r = run(args, timeout=timeout)
    if r.returncode != 0:
        raise TritonError(f"genai-perf failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    summary = next(artifacts.rglob("profile_export_genai_perf.json"))
    raw = summary.with_name("profile_export.json")
    return json.loads(summary.read_text()), json.loads(raw.read_text())


def main(argv: list[str] | None = None) -> int:
    try:
        return subprocess.call(_command(sys.argv[1:] if argv is None else argv), env=env())
    except TritonError as e:
        print(e, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
