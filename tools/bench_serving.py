"""Serving overhead: the same MoE engine through Triton (perf_analyzer, gRPC streaming) and called directly.

    python -m tritonmoe.tools.bench_serving --plot
    python -m tritonmoe.tools.bench_serving --device gpu --hidden 2048 --heads 16 --kv-heads 4 --layers 8 \\
        --experts 16 --expert-ffn 1408 --dtype bfloat16 --plot

Builds (once, under $TRITONMOE_HOME/models) a random-weight MoE of the given shape, or takes --checkpoint; serves
it from a temporary model repository through a real tritonserver and runs perf_analyzer at each concurrency level
(closed loop, every request streams exactly --max-tokens tokens: ignore_eos). Right after each level it drives the
same checkpoint in tritonmoe.backend.engine.Engine, loaded in this process, with the same prompts and the same
closed-loop concurrency from threads; the sweep is repeated (--repeat) and medians reported, because on a shared
machine background load drifts and back-to-back pairs share it. Both paths are loaded at once (twice the model
memory) but the idle one computes nothing. Both go through one metrics function, so the served/direct ratios
show what Triton (gRPC, the Python backend's IPC, response objects, the client process) costs per token.

Metrics, per request: TTFT = first streamed response - request start; ITL = (last - first response) / the tokens
generated between them (num_output_tokens; the backend skips tokens that decode to no text, so a response can
carry more than one). Output tokens/s = tokens of the requests that finished inside the measurement window /
the window. Prints a Markdown table with the command, machine, date and versions; --out writes JSON, --plot a
PNG into docs/figures/.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from . import perf_analyzer, tiny_models
from .tritonserver import TRITON_VERSION, TritonError, TritonServer, tritonmoe_home

REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL = "bench_moe"
# Prompt text that tokenizes the same everywhere; cut to --prompt-tokens tokens per prompt.
SOURCE_TEXT = (
    "def merge_sorted(left, right):\n    result = []\n    i = j = 0\n    while i < len(left) and j < len(right):\n"
    "        if left[i] <= right[j]:\n            result.append(left[i])\n            i += 1\n        else:\n"
    "            result.append(right[j])\n            j += 1\n    return result + left[i:] + right[j:]\n\n"
    "class LRUCache:\n    \"\"\"A dictionary that forgets the least recently used key when it is full.\"\"\"\n\n"
    "    def __init__(self, capacity):\n        self.capacity = capacity\n        self.data = {}\n\n"
    "import json\nimport os\n\ndef load_settings(path):\n    with open(path) as f:\n        return json.load(f)\n"
)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m tritonmoe.tools.bench_serving", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, help="HF checkpoint folder to benchmark instead of a built random MoE")
    p.add_argument("--arch", default="mixtral", choices=tiny_models.ARCHITECTURES)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--expert-ffn", type=int, default=96)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the built checkpoint (on the CPU the backend computes in float32 regardless)")
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu", help="KIND_CPU or KIND_GPU; direct: cuda:0")
    p.add_argument("--concurrency", default="1,4,16", help="comma-separated closed-loop concurrency levels")
    p.add_argument("--max-num-seqs", type=int, help="engine batch limit (default: the largest concurrency)")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32, help="tokens generated per request (exactly: ignore_eos)")
    p.add_argument("--num-prompts", type=int, default=8, help="distinct prompts, used round robin")
    p.add_argument("--interval", type=float, default=3.0,
                   help="seconds per measurement window; each level measures 3 windows")
    p.add_argument("--repeat", type=int, default=3,
                   help="sweeps of both paths, alternating per level; the table shows medians")
    p.add_argument("--skip-direct", action="store_true", help="only the served run")
    p.add_argument("--out", type=Path, default=Path("bench_serving.json"), help="JSON result file")
    p.add_argument("--plot", action="store_true", help="write a PNG (default docs/figures/serving_<device>.png)")
    p.add_argument("--plot-path", type=Path)
    p.add_argument("--workdir", type=Path, help="keep the model repository, inputs, profiles and logs here")
    a = p.parse_args(argv)
    a.levels = [int(c) for c in a.concurrency.split(",")]
    a.max_num_seqs = a.max_num_seqs or max(a.levels)
    return a


# ---- setup ---------------------------------------------------------------------------------------------------
def ensure_checkpoint(a) -> Path:
    if a.checkpoint:
        return a.checkpoint.resolve()
    spec = tiny_models.TinySpec(arch=a.arch, layers=a.layers, hidden=a.hidden, heads=a.heads, kv_heads=a.kv_heads,
                                experts=a.experts, top_k=a.top_k, expert_ffn=a.expert_ffn, dtype=a.dtype,
                                max_positions=max(512, 2 * (a.prompt_tokens + a.max_tokens)),
                                shard_mb=512)  # few large shards: the default 0.25 MiB suits only test fixtures
    name = (f"bench-{a.arch}-L{a.layers}-H{a.hidden}-A{a.heads}x{a.kv_heads}-E{a.experts}k{a.top_k}"
            f"-F{a.expert_ffn}-{a.dtype}")
    return tiny_models.build(spec, tritonmoe_home() / "models" / name.replace("_", "-"))


def make_prompts(tokenizer, count: int, tokens: int) -> list[str]:
    """``count`` different prompts of about ``tokens`` tokens: windows into SOURCE_TEXT at different offsets."""
    ids = tokenizer.encode(SOURCE_TEXT * (1 + tokens * count // 50))
    step = max(1, (len(ids) - tokens) // count)
    return [tokenizer.decode(ids[i * step:i * step + tokens]) for i in range(count)]


def write_repository(root: Path, checkpoint: Path, device: str, max_num_seqs: int) -> Path:
    """One model folder like model_repository/tiny_moe (the same model.py shim), pointing at ``checkpoint``."""
    d = root / MODEL
    (d / "1").mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO_ROOT / "model_repository" / "tiny_moe" / "1" / "model.py", d / "1" / "model.py")
    group = "{ count: 1, kind: KIND_GPU, gpus: [0] }" if device == "gpu" else "{ count: 1, kind: KIND_CPU }"
    params = {"checkpoint": str(checkpoint), "max_num_seqs": str(max_num_seqs), "dtype": "auto"}
    lines = ['backend: "python"', f"instance_group [{group}]"]
    lines += [f"parameters {{ key: {json.dumps(k)} value: {{ string_value: {json.dumps(v)} }} }}"
              for k, v in params.items()]
    (d / "config.pbtxt").write_text("\n".join(lines) + "\n")
    return root


# ---- metrics -------------------------------------------------------------------------------------------------
# A request record: start (s), the arrival time (s) of each streamed response and the cumulative output token count
# each response reports. Both runs are reduced to these, so both are summarized by the same code.
def summarize(records: list[dict], window: float) -> dict:
    ttft = [r["times"][0] - r["start"] for r in records if r["times"]]
    itl = [(r["times"][-1] - r["times"][0]) / (r["tokens"][-1] - r["tokens"][0])
           for r in records if len(r["times"]) > 1 and r["tokens"][-1] > r["tokens"][0]]
    tokens = [r["tokens"][-1] for r in records if r["tokens"]]

    def stats(values):  # milliseconds
        if not values:
            return {"mean": None, "p50": None, "p99": None}
        v = np.asarray(values) * 1000
        return {"mean": float(v.mean()), "p50": float(np.percentile(v, 50)), "p99": float(np.percentile(v, 99))}

    return {"requests": len(records), "window_s": window, "output_tokens": int(sum(tokens)),
            "tokens_per_request": float(np.mean(tokens)) if tokens else 0.0,
            "tokens_per_s": sum(tokens) / window if window > 0 else 0.0,
            "requests_per_s": len(records) / window if window > 0 else 0.0,
            "responses_per_request": float(np.mean([len(r["times"]) for r in records])) if records else 0.0,
            "ttft_ms": stats(ttft), "itl_ms": stats(itl)}


def profile_records(path: Path) -> tuple[list[dict], float, str]:
    """Request records and the window from perf_analyzer's --profile-export-file (one experiment per file).

    The file: {"version", "experiments": [{"experiment": {"mode", "value"}, "window_boundaries": [ns, ...],
    "requests": [{"timestamp": ns, "request_inputs": {...}, "response_timestamps": [ns, ...],
    "response_outputs": [{"text_output", "num_output_tokens", ...}, ...]}]}]}. It holds the requests of the
    measurement windows that perf_analyzer reports, which span window_boundaries[0]..[-1].
    """
    export = json.loads(path.read_text())
    exp = export["experiments"][-1]
    bounds = exp["window_boundaries"]
    records = []
    for req in exp["requests"]:
        times, tokens = [], []
        has_outputs = "response_outputs" in req
        outputs = req["response_outputs"] if has_outputs else [{}] * len(req["response_timestamps"])
        for ts, out in zip(req["response_timestamps"], outputs):
            if has_outputs and not out:
                continue  # an empty final response (flags only) carries no token
            times.append(ts / 1e9)
            tokens.append(int(out.get("num_output_tokens", len(tokens) + 1)))
        records.append({"start": req["timestamp"] / 1e9, "times": times, "tokens": tokens})
    return records, (bounds[-1] - bounds[0]) / 1e9, export.get("version", "?")


# ---- the two paths ------------------------------------------------------------------------------------------
def sampling_parameters(a) -> dict:
    return {"max_tokens": a.max_tokens, "ignore_eos": True, "temperature": 0.0}


class Served:
    """perf_analyzer against the model in a running tritonserver: one run per concurrency level."""

    def __init__(self, a, server: TritonServer, prompts: list[str], work: Path, say):
        self.a, self.server, self.work, self.say = a, server, work, say
        self.data = work / "input_data.json"
        self.data.write_text(json.dumps({"data": [{"text_input": [p], "stream": [True],
                                                   "sampling_parameters": [json.dumps(sampling_parameters(a))]}
                                                  for p in prompts]}))
        self.version = "?"
        from .client import generate

        for p in prompts[:2]:  # warm-up: first calls pay for lazy initialization in torch and the stub
            generate(server.http_url, MODEL, p, **sampling_parameters(a))

    def level(self, c: int, tag: str) -> dict:
        profile = self.work / f"profile_{tag}.json"
        args = ["-m", MODEL, "-i", "grpc", "--streaming", "--async", "-u", self.server.grpc_url,
                "--input-data", str(self.data), "--concurrency-range", f"{c}:{c}",
                "--measurement-interval", str(int(self.a.interval * 1000)),
                "--stability-percentage", "999",  # always 'stable': exactly 3 windows per level, like genai-perf
                "--profile-export-file", str(profile), "-f", str(self.work / f"perf_{tag}.csv")]
        self.say(f"perf_analyzer {shlex.join(args)}")
        r = perf_analyzer.run(args, timeout=120 + 20 * self.a.interval)
        if r.returncode != 0:
            raise TritonError(f"perf_analyzer failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
        records, window, self.version = profile_records(profile)
        self.wait_idle()
        return summarize(records, window)

    def wait_idle(self, timeout: float = 30.0) -> None:
        """perf_analyzer leaves its last requests running in the server: let them finish before the direct run.
        Idle = the model's generated-token counter holds still for half a second."""
        import urllib.request

        def generated() -> str:
            with urllib.request.urlopen(self.server.metrics_url, timeout=5) as r:
                return "".join(line for line in r.read().decode().splitlines()
                               if line.startswith("tritonmoe_generation_tokens_total"))

        deadline, last = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            now = generated()
            if now == last:
                return
            last = now
            time.sleep(0.5)


class Direct:
    """The same checkpoint in tritonmoe.backend.engine.Engine in this process, driven from threads."""

    def __init__(self, a, checkpoint: Path, prompts: list[str]):
        import torch

        from tritonmoe.backend.checkpoint import load_model, load_tokenizer
        from tritonmoe.backend.engine import Engine
        from tritonmoe.backend.sampling import SamplingParams

        device = torch.device("cuda", 0) if a.device == "gpu" else torch.device("cpu")
        self.engine = Engine(load_model(checkpoint, device, "auto"), load_tokenizer(checkpoint),
                             max_num_seqs=a.max_num_seqs).start()
        self.params = SamplingParams(**sampling_parameters(a))
        self.prompts, self.seconds = prompts, 3 * a.interval  # perf_analyzer measures 3 windows
        for p in prompts[:2]:
            self.request(p)

    def request(self, prompt: str) -> dict:
        start, times, tokens = time.perf_counter(), [], []
        for out in self.engine.generate(prompt, self.params):
            if out.error:
                raise RuntimeError(out.error)
            if out.text or out.finished:  # exactly the outputs the backend turns into streamed responses
                times.append(time.perf_counter())
                tokens.append(out.output_tokens)
        return {"start": start, "times": times, "tokens": tokens}

    def level(self, c: int, tag: str = "") -> dict:
        return summarize(*closed_loop(self.request, self.prompts, c, self.seconds))

    def close(self) -> None:
        self.engine.shutdown()


def closed_loop(request, prompts: list[str], concurrency: int, seconds: float) -> tuple[list[dict], float]:
    """perf_analyzer's concurrency mode in threads: each keeps one request open, sending the next as one ends.
    Like perf_analyzer, count the requests that end inside the window; the ones still open at its end drain."""
    done: list[dict] = []
    barrier = threading.Barrier(concurrency + 1)
    window = {}

    def worker(i: int) -> None:
        barrier.wait()  # all threads submit their first request at once
        k = i
        while time.perf_counter() < window["end"]:
            done.append(request(prompts[k % len(prompts)]))  # list.append is atomic under the GIL
            k += concurrency

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(concurrency)]
    for t in threads:
        t.start()
    window["start"] = time.perf_counter()
    window["end"] = window["start"] + seconds
    barrier.wait()
    for t in threads:
        t.join()
    inside = [r for r in done if window["start"] <= r["times"][-1] <= window["end"]]
    return inside, seconds


def run_genai_perf(a, server: TritonServer, checkpoint: Path, work: Path, say) -> dict | None:
    """Optional cross-check with genai-perf's own numbers; never installed by us. Not tried here: 0.0.5+ syntax."""
    exe = shutil.which("genai-perf") or (Path(sys.executable).parent / "genai-perf")
    if not Path(exe).exists():
        say("genai-perf is not installed: skipping it (the perf_analyzer numbers are computed the same way)")
        return None
    runs = {}
    for c in a.levels:
        # --output-tokens-mean-deterministic sends min_tokens = max_tokens, which our backend honours.
        cmd = [str(exe), "profile", "-m", MODEL, "--service-kind", "triton", "--backend", "vllm", "--streaming",
               "--url", server.grpc_url, "--concurrency", str(c), "--tokenizer", str(checkpoint),
               "--synthetic-input-tokens-mean", str(a.prompt_tokens), "--synthetic-input-tokens-stddev", "0",
               "--output-tokens-mean", str(a.max_tokens), "--output-tokens-stddev", "0",
               "--output-tokens-mean-deterministic", "--measurement-interval", str(int(a.interval * 1000)),
               "--artifact-dir", str(work / f"genai_perf_c{c}")]
        say(f"genai-perf c={c}: {shlex.join(cmd)}")
        r = subprocess.run(cmd, capture_output=True, text=True, env=perf_analyzer.env(), timeout=600)
        runs[c] = {"returncode": r.returncode, "output_tail": (r.stdout + r.stderr)[-4000:],
                   "artifact_dir": str(work / f"genai_perf_c{c}")}
        say(runs[c]["output_tail"][-2000:])
    return runs


def median_summary(runs: list[dict]) -> dict:
    """Per-field median over repeats (a run's fields are numbers or dicts of numbers)."""
    out = {}
    for key, value in runs[0].items():
        if isinstance(value, dict):
            out[key] = median_summary([r[key] for r in runs])
        else:
            values = [r[key] for r in runs if r[key] is not None]
            out[key] = float(np.median(values)) if values else None
    return out


def run_all(a, checkpoint: Path, prompts: list[str], work: Path, say) -> dict:
    """Served and direct levels back to back, repeated: on a shared machine the background load drifts, and a
    pair measured within seconds of each other shares it. The idle path holds memory but uses no compute."""
    repo = write_repository(work / "model_repository", checkpoint, a.device, a.max_num_seqs)
    served_runs = {c: [] for c in a.levels}
    direct_runs = {c: [] for c in a.levels}
    with TritonServer(repo, models=[MODEL], log_path=work / "tritonserver.log") as server:
        say(f"tritonserver ready (log {server.log_path})")
        served = Served(a, server, prompts, work, say)
        direct = None if a.skip_direct else Direct(a, checkpoint, prompts)
        try:
            for rep in range(a.repeat):
                for c in a.levels:
                    served_runs[c].append(served.level(c, f"c{c}_r{rep}"))
                    say(f"  [{rep + 1}/{a.repeat}] served c={c}: {fmt_row(served_runs[c][-1])}")
                    if direct:
                        direct_runs[c].append(direct.level(c))
                        say(f"  [{rep + 1}/{a.repeat}] direct c={c}: {fmt_row(direct_runs[c][-1])}")
        finally:
            if direct:
                direct.close()
        genai = run_genai_perf(a, server, checkpoint, work, say)
    result = {"perf_analyzer_version": served.version, "genai_perf": genai,
              "served": {c: median_summary(r) for c, r in served_runs.items()},
              "direct": None if a.skip_direct else {c: median_summary(r) for c, r in direct_runs.items()},
              "runs": {"served": served_runs, "direct": None if a.skip_direct else direct_runs}}
    if not a.skip_direct:
        result["ratios"] = {c: ratios(result["served"][c], result["direct"][c]) for c in a.levels}
        # the spread of the back-to-back pairs says how far to trust the medians
        result["ratio_ranges"] = {}
        for c in a.levels:
            pairs = [ratios(s, d) for s, d in zip(served_runs[c], direct_runs[c])]
            result["ratio_ranges"][c] = {k: [min(r[k] for r in pairs), max(r[k] for r in pairs)]
                                         for k in ("tokens_per_s", "ttft", "itl")}
    return result


def ratios(served: dict, direct: dict) -> dict:
    """Above 1 means Triton costs: direct/served for throughput, served/direct for latencies."""
    return {"tokens_per_s": ratio(direct["tokens_per_s"], served["tokens_per_s"]),
            "ttft": ratio(served["ttft_ms"]["mean"], direct["ttft_ms"]["mean"]),
            "itl": ratio(served["itl_ms"]["mean"], direct["itl_ms"]["mean"]),
            "itl_added_ms": served["itl_ms"]["mean"] - direct["itl_ms"]["mean"]}


# ---- report --------------------------------------------------------------------------------------------------
def fmt_row(s: dict) -> str:
    t, i = s["ttft_ms"], s["itl_ms"]
    return (f"{s['tokens_per_s']:.1f} tok/s, TTFT {t['mean']:.1f} ms (p99 {t['p99']:.1f}), "
            f"ITL {i['mean']:.2f} ms (p99 {i['p99']:.2f}), {s['requests']} requests")


def machine_info(device: str) -> dict:
    import torch
    import transformers

    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    try:
        client = importlib.metadata.version("tritonclient")
    except importlib.metadata.PackageNotFoundError:
        client = "?"
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu, "device": device, "platform": platform.platform(),
            "python": platform.python_version(), "tritonserver": TRITON_VERSION, "tritonclient": client,
            "torch": torch.__version__, "transformers": transformers.__version__}


def ratio(num, den):
    return num / den if num is not None and den else None


def table(result: dict) -> str:
    served, direct = result["served"], result.get("direct") or {}
    lines = [f"Medians of {result['repeat']} sweeps per path (requests: per 3-window measurement).", "",
             "| concurrency | path | output tok/s | TTFT mean / p50 / p99 (ms) | ITL mean / p50 / p99 (ms) "
             "| requests |",
             "|---:|---|---:|---:|---:|---:|"]
    for c in result["concurrency"]:
        for name, s in (("Triton (perf_analyzer)", served.get(c)), ("direct Engine", direct.get(c))):
            if s:
                t, i = s["ttft_ms"], s["itl_ms"]
                lines.append(f"| {c} | {name} | {s['tokens_per_s']:.1f} | {t['mean']:.1f} / {t['p50']:.1f} / "
                             f"{t['p99']:.1f} | {i['mean']:.2f} / {i['p50']:.2f} / {i['p99']:.2f} "
                             f"| {s['requests']:.0f} |")
    if direct:
        lines += ["", "Triton's cost: ratios of the medians (in brackets: the range over the back-to-back pairs).", "",
                  "| concurrency | tok/s direct/served | TTFT served/direct | ITL served/direct | ITL added (ms) |",
                  "|---:|---:|---:|---:|---:|"]
        for c, r in result["ratios"].items():
            lo_hi = result["ratio_ranges"][c]
            span = lambda k: f"{r[k]:.2f}x ({lo_hi[k][0]:.2f}-{lo_hi[k][1]:.2f})"  # noqa: E731
            lines.append(f"| {c} | {span('tokens_per_s')} | {span('ttft')} | {span('itl')} | "
                         f"{r['itl_added_ms']:+.2f} |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = result["concurrency"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for name, runs, style in (("Triton (perf_analyzer)", result["served"], "o-"),
                              ("direct Engine", result.get("direct") or {}, "s--")):
        if runs:
            each = result["runs"]["served" if runs is result["served"] else "direct"]
            for ax, get in ((ax1, lambda s: s["tokens_per_s"]), (ax2, lambda s: s["itl_ms"]["mean"])):
                mid = np.array([get(runs[c]) for c in levels])
                lo = np.array([min(get(s) for s in each[c]) for c in levels])
                hi = np.array([max(get(s) for s in each[c]) for c in levels])
                ax.errorbar(levels, mid, yerr=[mid - lo, hi - mid], fmt=style, capsize=3, label=name)
    m = result["machine"]
    where = m["gpu"] if m["device"] == "gpu" else f"{m['cpu']}, {m['cores']} cores"
    for ax, label in ((ax1, "output tokens/s"), (ax2, "inter-token latency, mean (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{result['model']} on {where}: {result['prompt_tokens']} prompt + {result['max_tokens']} new "
                 f"tokens; median and range of {result['repeat']} sweeps", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    say = lambda msg: print(msg, flush=True)  # noqa: E731
    command = "python -m tritonmoe.tools.bench_serving " + shlex.join(argv)
    machine = machine_info(a.device)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    say(f"command: {command}\ndate:    {date}\nmachine: {machine['cpu']}, {machine['cores']} cores"
        f"{', GPU ' + machine['gpu'] if machine['gpu'] else ''}\nversions: tritonserver {TRITON_VERSION}, "
        f"tritonclient {machine['tritonclient']}, torch {machine['torch']}, transformers {machine['transformers']}")
    if a.device == "gpu" and not machine["gpu"]:
        say("error: --device gpu but torch sees no CUDA device")
        return 2

    load_before = os.getloadavg()[0]
    if load_before > 0.5 * (os.cpu_count() or 1):
        say(f"warning: load average {load_before:.1f} on {os.cpu_count()} cores: other work will skew the numbers")
    t = time.perf_counter()
    checkpoint = ensure_checkpoint(a)
    from tritonmoe.backend.checkpoint import load_tokenizer

    prompts = make_prompts(load_tokenizer(checkpoint), a.num_prompts, a.prompt_tokens)
    say(f"checkpoint: {checkpoint} ({time.perf_counter() - t:.1f}s)")

    work = a.workdir or Path(tempfile.mkdtemp(prefix="bench-serving-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        runs = run_all(a, checkpoint, prompts, work, say)
    except TritonError as e:
        say(f"error: {e}")
        return 1

    config = json.loads((checkpoint / "config.json").read_text())
    result = {
        "command": command, "date": date, "machine": machine, "checkpoint": str(checkpoint),
        "model": f"{config.get('model_type', '?')} L{config.get('num_hidden_layers')} H{config.get('hidden_size')}",
        "concurrency": a.levels, "prompt_tokens": a.prompt_tokens, "max_tokens": a.max_tokens,
        "max_num_seqs": a.max_num_seqs, "interval_s": a.interval, "repeat": a.repeat, "workdir": str(work),
        # 1-minute load average before and after (this run itself adds about 2): other work skews every number
        "loadavg_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        **runs,
    }
    short = {c: s["tokens_per_request"] for c, s in runs["served"].items() if s["tokens_per_request"] != a.max_tokens}
    if short:
        say(f"warning: served requests averaged {short} tokens, not {a.max_tokens}")
    say("\n" + table(result))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1))
    say(f"\nresults: {a.out}")
    if a.plot:
        path = a.plot_path or REPO_ROOT / "docs" / "figures" / f"serving_{a.device}.png"
        plot(result, path)
        say(f"plot: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
