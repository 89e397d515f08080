"""Learned MoE routing for offloading benchmarks: train a small MoE on real text that ships offline, record its
routing traces, and report their skew beside MoE-Infinity's observations.

Random-weight models route near uniformly, which makes every cache and prefetch policy look alike. This tool
trains a small decoder-only MoE with the *layer x expert x top-k shape of a target model* (hidden size and expert
width small, so it trains on a CPU in minutes) on text found on the machine -- the interpreter's Python sources,
/usr/share/doc, man pages -- with the usual load-balancing auxiliary loss, then runs held-out documents through
it and stores, per request, per MoE layer and per token, the experts its router selected (prompt = prefill, the
document's continuation = decode; the model is causal, so routing a continuation token in one pass equals routing
it in incremental decoding). Because the shape matches the target, the benchmark maps trained layer ``i`` /
expert ``e`` onto full-size layer ``i`` / expert ``e`` one to one.

It also stores, per token and layer ``l``, the experts the *next* layer's router would pick from layer ``l``'s
expert input (``lookahead``): what the router-lookahead prefetch baseline would see, replayed in the benchmark.

    python -m tritonmoe.tools.train_routing --shape qwen3 --minutes 4 --out runs/routing/qwen3.npz
    python -m tritonmoe.tools.train_routing --report runs/routing/qwen3.npz
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import sysconfig
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

# Target shapes: (MoE layers, routed experts, top-k, shared experts). DeepSeek-V2-Lite has 27 layers whose first
# is dense, so 26 MoE layers; Qwen3-30B-A3B has 48, all MoE; Mixtral-8x7B 32 x 8 top-2.
SHAPES = {
    "dsv2lite": (26, 64, 6, 2),
    "qwen3": (48, 128, 8, 0),
    "mixtral": (32, 8, 2, 0),
}
CATEGORIES = ("python", "doc", "man")


@dataclass
class TrainConfig:
    layers: int = 26
    experts: int = 64
    top_k: int = 6
    shared_experts: int = 2
    hidden: int = 64
    heads: int = 4
    expert_ffn: int = 32
    vocab: int = 4096
    context: int = 512
    batch: int = 4
    lr: float = 3e-3
    aux_coef: float = 0.01  # Switch-Transformer load-balancing loss weight, as Mixtral / Qwen-MoE train with
    capacity_factor: float = 2.0  # per-expert capacity in training only; recorded routing is never dropped
    minutes: float = 4.0
    max_steps: int = 0  # 0: until the time budget ends
    seed: int = 0
    requests: int = 160
    prompt_len: int = 512
    gen_len: int = 64
    corpus_mb: float = 24.0


# ---------------------------------------------------------------------------------------------------------- corpus
def _read_text(path: Path, limit: int = 1 << 16) -> str | None:
    """Text of a file (gunzipped if .gz), None for binary or unreadable files."""
    try:
        raw = gzip.open(path).read(limit) if path.suffix == ".gz" else path.open("rb").read(limit)
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError, EOFError, zlib.error):
        return None
    if not text.strip() or sum(not (c.isprintable() or c in "\n\t\r") for c in text) > 0.02 * len(text):
        return None
    return text


def corpus(max_mb: float = 24.0) -> list[tuple[str, str, str]]:
    """``(category, path, text)`` documents: Python sources, Debian documentation, man pages (sorted, so the same
    machine always gives the same corpus). Each category contributes at most a third of ``max_mb``."""
    roots = {
        "python": (Path(sysconfig.get_paths()["stdlib"]), ["*.py"]),
        "doc": (Path("/usr/share/doc"), ["*"]),
        "man": (Path("/usr/share/man"), ["man*/*.gz", "man*/*.[1-9]"]),
    }
    docs = []
    for category, (root, patterns) in roots.items():
        budget = max_mb * 2**20 / len(roots)
        paths = sorted({p for pat in patterns for p in root.rglob(pat) if p.is_file() and not p.is_symlink()})
        # spread the budget over the whole tree (every 'step'-th file) rather than its alphabetic head
        step = max(1, int(sum(p.stat().st_size for p in paths) / budget))
        for p in paths[::step]:
            if budget <= 0:
                break
            text = _read_text(p)
            if text and len(text) > 200:
                docs.append((category, str(p), text))
                budget -= len(text)
    return docs


def is_held_out(path: str) -> bool:
    """One document in six is held out of training (stable over runs): traces come from these only."""
    return zlib.crc32(path.encode()) % 6 == 0


def make_tokenizer(texts: list[str], vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


# ----------------------------------------------------------------------------------------------------------- model
def build_model(cfg: TrainConfig):
    import torch
    from torch import nn
    import torch.nn.functional as F

    class RMSNorm(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(d))

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight

    def rope(x, pos):  # x [B, heads, T, hd]
        hd = x.shape[-1]
        inv = 1.0 / (10000 ** (torch.arange(0, hd, 2, dtype=torch.float32, device=x.device) / hd))
        ang = pos[:, None].float() * inv[None]
        cos, sin = ang.cos(), ang.sin()
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)

    class MoE(nn.Module):
        """Softmax router, top-k, SwiGLU experts. Tokens are dispatched to per-expert capacity buffers so the
        experts run as three batched matmuls (fast on a CPU); pairs beyond capacity are dropped in training only."""

        def __init__(self):
            super().__init__()
            d, f, E = cfg.hidden, cfg.expert_ffn, cfg.experts
            self.router = nn.Linear(d, E, bias=False)
            self.w_gate = nn.Parameter(torch.randn(E, d, f) / math.sqrt(d))
            self.w_up = nn.Parameter(torch.randn(E, d, f) / math.sqrt(d))
            self.w_down = nn.Parameter(torch.randn(E, f, d) / math.sqrt(f))
            self.shared = (nn.Sequential(nn.Linear(d, 2 * f * cfg.shared_experts, bias=False))
                           if cfg.shared_experts else None)
            self.shared_down = nn.Linear(f * cfg.shared_experts, d, bias=False) if cfg.shared_experts else None

        def route(self, x):
            probs = F.softmax(self.router(x), dim=-1, dtype=torch.float32)
            top_p, top_i = probs.topk(cfg.top_k, dim=-1)
            return probs, top_p / top_p.sum(-1, keepdim=True), top_i

        def forward(self, x):  # x [N, d]
            N, d = x.shape
            E, k = cfg.experts, cfg.top_k
            probs, weights, idx = self.route(x)
            flat = idx.reshape(-1)  # pair p = token p // k
            cap = max(4, int(math.ceil(cfg.capacity_factor * N * k / E)))
            onehot = F.one_hot(flat, E)
            pos = (onehot.cumsum(0) - 1).gather(1, flat[:, None]).squeeze(1)  # rank of the pair in its expert
            keep = pos < cap
            slot = torch.where(keep, flat * cap + pos, torch.full_like(flat, E * cap))  # dropped -> dummy row
            buf = x.new_zeros(E * cap + 1, d)
            buf = buf.index_copy(0, slot, x.repeat_interleave(k, dim=0))
            h = buf[:-1].view(E, cap, d)
            y = torch.bmm(F.silu(torch.bmm(h, self.w_gate)) * torch.bmm(h, self.w_up), self.w_down)
            y = torch.cat([y.reshape(E * cap, d), y.new_zeros(1, d)])
            out = (y[slot] * weights.reshape(-1, 1).to(y.dtype)).view(N, k, d).sum(1)
            if self.shared is not None:
                g, u = self.shared(x).chunk(2, dim=-1)
                out = out + self.shared_down(F.silu(g) * u)
            # Switch aux loss: E * sum_e (share of pairs to e) * (mean router prob of e); 1.0 when balanced
            frac = onehot.float().mean(0)
            aux = E * (frac * probs.mean(0)).sum()
            return out, aux

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            d = cfg.hidden
            self.n1, self.n2 = RMSNorm(d), RMSNorm(d)
            self.qkv = nn.Linear(d, 3 * d, bias=False)
            self.o = nn.Linear(d, d, bias=False)
            self.moe = MoE()

        def attn(self, x, pos):
            B, T, d = x.shape
            q, k, v = self.qkv(x).view(B, T, 3, cfg.heads, d // cfg.heads).permute(2, 0, 3, 1, 4)
            q, k = rope(q, pos), rope(k, pos)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.o(y.transpose(1, 2).reshape(B, T, d))

        def forward(self, x, pos):
            x = x + self.attn(self.n1(x), pos)
            h = self.n2(x)
            y, aux = self.moe(h.reshape(-1, h.shape[-1]))
            return x + y.view_as(x), aux, h

    class TinyMoE(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(cfg.vocab, cfg.hidden)
            self.blocks = nn.ModuleList(Block() for _ in range(cfg.layers))
            self.norm = RMSNorm(cfg.hidden)
            self.head = nn.Linear(cfg.hidden, cfg.vocab, bias=False)

        def forward(self, ids, capture: bool = False):
            x = self.embed(ids)
            pos = torch.arange(ids.shape[1], device=ids.device)
            aux_total, inputs = 0.0, []
            for blk in self.blocks:
                x, aux, h = blk(x, pos)
                aux_total = aux_total + aux
                if capture:
                    inputs.append(h)  # each MoE layer's input: what its router (and the previous lookahead) sees
            return self.head(self.norm(x)), aux_total / len(self.blocks), inputs

    torch.manual_seed(cfg.seed)
    return TinyMoE()


# ------------------------------------------------------------------------------------------------ train and trace
def prepare_corpus(cfg: TrainConfig, out: Path, log=print) -> Path:
    """Read and tokenize the corpus once: the training token stream and the held-out documents' tokens, in one npz
    (so training can run on another machine -- the GPU one -- with exactly this text and tokenizer)."""
    t0 = time.time()
    docs = corpus(cfg.corpus_mb)
    train_docs = [d for d in docs if not is_held_out(d[1])]
    held = [d for d in docs if is_held_out(d[1])]
    tok = make_tokenizer([t for _, _, t in train_docs], cfg.vocab)
    eos = tok.token_to_id("<eos>")
    stream = []
    for _, _, text in train_docs:
        stream.extend(tok.encode(text).ids + [eos])
    held_ids = [tok.encode(text).ids for _, _, text in held]
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, train=np.array(stream, dtype=np.uint16),
                        held=np.array([i for ids in held_ids for i in ids], dtype=np.uint16),
                        held_offsets=np.cumsum([0] + [len(ids) for ids in held_ids]),
                        held_category=np.array([c for c, _, _ in held]), held_path=np.array([p for _, p, _ in held]),
                        vocab=tok.get_vocab_size(), documents=len(docs),
                        corpus_bytes=sum(len(t) for *_, t in docs))
    log(f"corpus: {len(docs)} documents ({sum(len(t) for *_, t in docs) / 2**20:.1f} MiB), {len(train_docs)} "
        f"train / {len(held)} held out; {len(stream)} training tokens; vocab {tok.get_vocab_size()}; "
        f"{time.time() - t0:.1f}s -> {out}")
    return out


def train_and_trace(cfg: TrainConfig, corpus_path: Path, out: Path, device: str = "cpu", log=print) -> dict:
    import torch
    import torch.nn.functional as F

    t0 = time.time()
    z = np.load(corpus_path, allow_pickle=False)
    if int(z["vocab"]) > cfg.vocab:
        raise ValueError(f"{corpus_path} has a vocabulary of {int(z['vocab'])}, more than --vocab {cfg.vocab}")
    stream = torch.as_tensor(z["train"].astype(np.int64))
    offs = z["held_offsets"]
    held = [(str(c), str(p), z["held"][offs[i]:offs[i + 1]].astype(np.int64).tolist())
            for i, (c, p) in enumerate(zip(z["held_category"], z["held_path"]))]
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model = build_model(cfg).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(cfg.seed)
    window = torch.arange(cfg.context + 1)
    deadline = time.time() + cfg.minutes * 60
    curve, step = [], 0
    model.train()
    while (cfg.max_steps and step < cfg.max_steps) or (not cfg.max_steps and time.time() < deadline):
        starts = torch.randint(0, len(stream) - cfg.context - 1, (cfg.batch,), generator=gen)
        batch = stream[starts[:, None] + window].to(dev, non_blocking=True)
        lr = cfg.lr * min(1.0, (step + 1) / 50)  # short warm-up
        for g in opt.param_groups:
            g["lr"] = lr
        logits, aux, _ = model(batch[:, :-1])
        lm = F.cross_entropy(logits.reshape(-1, cfg.vocab), batch[:, 1:].reshape(-1))
        loss = lm + cfg.aux_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 20 == 0:
            curve.append((step, round(time.time() - t0, 1), round(lm.item(), 4), round(aux.item(), 4)))
            log(f"step {step:5d}  lm {lm.item():.3f}  aux {aux.item():.3f}  {time.time() - t0:.0f}s")
        step += 1
    curve.append((step, round(time.time() - t0, 1), round(lm.item(), 4), round(aux.item(), 4)))
    train_s = time.time() - t0

    # requests: the first prompt_len + gen_len tokens of held-out documents long enough for both
    T = cfg.prompt_len + cfg.gen_len
    reqs = []
    for cat, path, ids in held:
        if len(ids) >= T:
            reqs.append((cat, path, ids[:T]))
    # balance categories round-robin so every domain is represented whatever the request count
    by_cat = {c: [r for r in reqs if r[0] == c] for c in CATEGORIES}
    chosen = []
    while len(chosen) < cfg.requests and any(by_cat.values()):
        for c in CATEGORIES:
            if by_cat[c] and len(chosen) < cfg.requests:
                chosen.append(by_cat[c].pop(0))
    if not chosen:
        raise RuntimeError(f"no held-out document has {T} tokens")
    R = len(chosen)
    dtype = np.uint8 if cfg.experts <= 256 else np.uint16
    experts = np.zeros((R, cfg.layers, T, cfg.top_k), dtype=dtype)
    # the lookahead baseline only uses how often each expert is picked: per-token picks for decode tokens, counts
    # over the prompt for prefill (keeps the file small enough to travel)
    lookahead = np.zeros((R, max(cfg.layers - 1, 0), cfg.gen_len, cfg.top_k), dtype=dtype)
    lookahead_prefill = np.zeros((R, max(cfg.layers - 1, 0), cfg.experts), dtype=np.uint16)
    tokens = np.array([ids for _, _, ids in chosen], dtype=np.int32)
    model.eval()
    with torch.no_grad():
        for s in range(0, R, 8):
            ids = torch.as_tensor(tokens[s:s + 8], dtype=torch.long, device=dev)
            _, _, inputs = model(ids, capture=True)
            for layer, h in enumerate(inputs):
                blk = model.blocks[layer]
                flat = h.reshape(-1, cfg.hidden)
                idx = blk.moe.route(flat)[2].view(len(ids), T, cfg.top_k)
                experts[s:s + len(ids), layer] = np.sort(idx.cpu().numpy(), axis=-1).astype(dtype)
                if layer + 1 < cfg.layers:
                    nxt = model.blocks[layer + 1].moe.route(flat)[2].view(len(ids), T, cfg.top_k)
                    nxt = nxt.cpu().numpy()
                    lookahead[s:s + len(ids), layer] = np.sort(nxt[:, cfg.prompt_len:], axis=-1).astype(dtype)
                    for j, row in enumerate(nxt[:, :cfg.prompt_len]):
                        lookahead_prefill[s + j, layer] = np.bincount(row.ravel(), minlength=cfg.experts)
    # split: requests whose path hashes even fill the EAMC (MoE-Infinity's offline trace collection), the rest are
    # replayed; both held out of training
    split = np.array(["eamc" if zlib.crc32((p + "#split").encode()) % 2 == 0 else "eval" for _, p, _ in chosen])
    meta = {"config": asdict(cfg), "train_steps": step, "train_seconds": round(train_s, 1), "device": str(dev),
            "curve": curve, "documents": int(z["documents"]), "corpus_bytes": int(z["corpus_bytes"]),
            "training_tokens": int(len(stream)), "tokens_seen": step * cfg.batch * cfg.context,
            "created": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    out.parent.mkdir(parents=True, exist_ok=True)
    # top-k sets are stored sorted (order within a token carries nothing the offloader uses): compresses better
    np.savez_compressed(out, experts=experts, lookahead=lookahead, lookahead_prefill=lookahead_prefill, tokens=tokens.astype(np.uint16),
                        category=np.array([c for c, _, _ in chosen]), path=np.array([p for _, p, _ in chosen]),
                        split=split, prompt_len=cfg.prompt_len, gen_len=cfg.gen_len, num_experts=cfg.experts,
                        meta=json.dumps(meta))
    log(f"wrote {out}: {R} requests ({(split == 'eamc').sum()} eamc / {(split == 'eval').sum()} eval), "
        f"{step} steps in {train_s:.0f}s, final lm loss {curve[-1][2]}")
    return meta


# ------------------------------------------------------------------------------------------------------ the traces
class Traces:
    """A routing trace file. ``experts[r, l, t]``: the top-k experts of request ``r``'s token ``t`` at MoE layer
    ``l``; tokens ``< prompt_len`` are the prefill, the rest the decode. ``lookahead[r, l, t]``: what layer
    ``l + 1``'s router picks from layer ``l``'s expert input at decode token ``t``."""

    def __init__(self, path: str | Path):
        z = np.load(path, allow_pickle=False)
        self.path = Path(path)
        self.experts = z["experts"]
        self.lookahead = z["lookahead"]  # [R, L-1, gen_len, k]: decode tokens
        self.lookahead_prefill = z["lookahead_prefill"]  # [R, L-1, E]: picks over the prompt
        self.category = z["category"]
        self.split = z["split"]
        self.prompt_len = int(z["prompt_len"])
        self.gen_len = int(z["gen_len"])
        self.num_experts = int(z["num_experts"])
        self.meta = json.loads(str(z["meta"]))
        self.requests, self.layers, _, self.top_k = self.experts.shape

    def indices(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.split == split)

    def eam(self, r: int, gen_len: int | None = None) -> np.ndarray:
        """Request ``r``'s EAM ``[2 (prefill, decode), L, E]`` token counts, as the offloader traces it."""
        return request_eam(self.experts[r], self.prompt_len, self.num_experts, gen_len)


def request_eam(routes: np.ndarray, prompt_len: int, num_experts: int, gen_len: int | None = None) -> np.ndarray:
    """``routes [L, T, k]`` -> ``[2, L, E]`` counts (prefill rows ``< prompt_len``, decode the next ``gen_len``)."""
    L = routes.shape[0]
    end = routes.shape[1] if gen_len is None else prompt_len + gen_len
    out = np.zeros((2, L, num_experts), dtype=np.int64)
    for phase, sl in enumerate((slice(0, prompt_len), slice(prompt_len, end))):
        ids = routes[:, sl].reshape(L, -1).astype(np.int64) + (np.arange(L) * num_experts)[:, None]
        out[phase] = np.bincount(ids.ravel(), minlength=L * num_experts).reshape(L, num_experts)
    return out


def skew_stats(experts: np.ndarray, prompt_len: int, num_experts: int, batch: int = 8, seed: int = 0) -> dict:
    """The skew figures MoE-Infinity motivates its design with, for traces ``experts [R, L, T, k]``."""
    R, L, T, k = experts.shape
    E = num_experts
    eams = np.stack([request_eam(experts[r], prompt_len, E) for r in range(R)]).astype(np.float64)  # [R,2,L,E]
    touched = eams > 0
    out = {"requests": R, "layers": L, "experts": E, "top_k": k, "decode_tokens": T - prompt_len}
    out["touched_per_request_prefill"] = float(touched[:, 0].mean())
    out["touched_per_request_decode"] = float(touched[:, 1].mean())
    # a decode step of a batch: the union of the batch's requests' experts over the whole decode
    rng = np.random.default_rng(seed)
    order = rng.permutation(R)
    groups = [order[i:i + batch] for i in range(0, R - batch + 1, batch)] or [order]
    out["touched_per_batch_decode"] = float(np.mean([touched[g, 1].any(axis=0).mean() for g in groups]))
    out["batch"] = batch
    # reuse within a request: share of decode (layer, token) expert uses whose expert this request already used
    # at that layer earlier in its decode (an unbounded per-request cache's hit rate), and counting the prompt too
    dec = experts[:, :, prompt_len:]
    seen_d = np.zeros((R, L, E), dtype=bool)
    seen_p = touched[:, 0].copy()
    hits_d = hits_p = 0
    for t in range(dec.shape[2]):
        step = dec[:, :, t].astype(np.int64)  # [R, L, k]
        r_ix, l_ix = np.meshgrid(np.arange(R), np.arange(L), indexing="ij")
        hits_d += seen_d[r_ix[..., None], l_ix[..., None], step].sum()
        hits_p += (seen_p[r_ix[..., None], l_ix[..., None], step] | seen_d[r_ix[..., None], l_ix[..., None], step]).sum()
        seen_d[r_ix[..., None], l_ix[..., None], step] = True
    uses = dec.size
    out["decode_reuse_within_request"] = float(hits_d / uses) if uses else 0.0
    out["decode_reuse_incl_prompt"] = float(hits_p / uses) if uses else 0.0
    # popularity: share of a layer's uses going to its most-used 10% of experts, within one request's decode
    # (skewed if reuse is skewed) and over all requests pooled (uniform if load balancing worked)
    top = max(1, int(round(0.1 * E)))

    def top_share(m):  # m [..., E] counts
        s = np.sort(m, axis=-1)[..., ::-1]
        tot = s.sum(-1)
        return np.divide(s[..., :top].sum(-1), tot, out=np.zeros_like(tot), where=tot > 0)

    out["top10pct_share_within_request_decode"] = float(top_share(eams[:, 1]).mean())
    out["top10pct_share_within_request_prefill"] = float(top_share(eams[:, 0]).mean())
    out["top10pct_share_all_requests"] = float(top_share(eams.sum(axis=(0, 1))).mean())
    pooled = eams.sum(axis=(0, 1))  # [L, E]
    p = pooled / pooled.sum(-1, keepdims=True)
    out["normalised_entropy_all_requests"] = float((-(p * np.log(np.where(p > 0, p, 1))).sum(-1) / np.log(E)).mean())
    # similarity of requests: mean best-match cosine of a request's decode EAM with every other request's, vs the
    # mean cosine of random pairs; and greedy clusters at cosine >= 0.7 (the paper: 10-30 clusters per 1,000)
    flat = eams[:, 1].reshape(R, -1)
    norm = np.linalg.norm(flat, axis=1, keepdims=True)
    unit = np.divide(flat, norm, out=np.zeros_like(flat), where=norm > 0)
    sim = unit @ unit.T
    np.fill_diagonal(sim, -1)
    out["decode_eam_best_match_cosine"] = float(sim.max(axis=1).mean()) if R > 1 else 0.0
    off = sim[~np.eye(R, dtype=bool)]
    out["decode_eam_mean_pair_cosine"] = float(off.mean()) if off.size else 0.0
    centres: list[np.ndarray] = []
    for u in unit:
        if not centres or max(float(c @ u) for c in centres) < 0.7:
            centres.append(u)
    out["clusters_cos0.7"] = len(centres)
    return out


def uniform_like(experts: np.ndarray, num_experts: int, seed: int = 0) -> np.ndarray:
    """Routing of the same shape, each token's k experts drawn uniformly without replacement: the no-skew reference."""
    rng = np.random.default_rng(seed)
    R, L, T, k = experts.shape
    keys = rng.random((R, L, T, num_experts))
    return np.argpartition(keys, k - 1, axis=-1)[..., :k].astype(experts.dtype)


PAPER = {  # MoE-Infinity (arXiv 2401.14361) observations, for the report's last column
    "touched_per_request_decode": "< 5% (~100-expert models), ~25% Mixtral",
    "decode_reuse_within_request": "skewed: few experts reused",
    "top10pct_share_within_request_decode": "skewed within a request",
    "top10pct_share_all_requests": "near uniform over many",
    "clusters_cos0.7": "10-30 per 1,000 requests",
}


def report(path: str | Path, gen_len: int | None = None) -> tuple[dict, dict]:
    tr = Traces(path)
    T = tr.prompt_len + (tr.gen_len if gen_len is None else gen_len)
    learned = skew_stats(tr.experts[:, :, :T], tr.prompt_len, tr.num_experts)
    uniform = skew_stats(uniform_like(tr.experts[:, :, :T], tr.num_experts), tr.prompt_len, tr.num_experts)
    m = tr.meta
    print(f"{path}: {tr.requests} requests x {tr.layers} layers x {tr.num_experts} experts, top-{tr.top_k}; "
          f"prompt {tr.prompt_len}, decode {T - tr.prompt_len} tokens; trained {m['train_steps']} steps in "
          f"{m['train_seconds']}s, final lm loss {m['curve'][-1][2]} (aux {m['curve'][-1][3]})")
    print(f"| statistic | learned | uniform routing | MoE-Infinity paper |\n| --- | --- | --- | --- |")
    for key in ("touched_per_request_prefill", "touched_per_request_decode", "touched_per_batch_decode",
                "decode_reuse_within_request", "decode_reuse_incl_prompt", "top10pct_share_within_request_prefill",
                "top10pct_share_within_request_decode", "top10pct_share_all_requests",
                "normalised_entropy_all_requests", "decode_eam_best_match_cosine", "decode_eam_mean_pair_cosine",
                "clusters_cos0.7"):
        a, b = learned[key], uniform[key]
        fmt = (lambda v: f"{v}") if isinstance(a, int) else (lambda v: f"{v:.3f}")
        print(f"| {key} | {fmt(a)} | {fmt(b)} | {PAPER.get(key, '')} |")
    return learned, uniform


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--report", metavar="NPZ", help="print the skew table of a trace file and exit")
    p.add_argument("--shape", choices=sorted(SHAPES), help="target shape (layers, experts, top-k, shared)")
    p.add_argument("--out", default="runs/routing/traces.npz")
    p.add_argument("--corpus", metavar="NPZ", help="tokenized corpus (built by --prepare-only, or here when missing)")
    p.add_argument("--prepare-only", action="store_true", help="only read and tokenize the corpus into --corpus")
    p.add_argument("--device", default="cpu")
    for f, v in asdict(TrainConfig()).items():
        p.add_argument("--" + f.replace("_", "-"), type=type(v), default=None)
    a = p.parse_args(argv)
    if a.report:
        report(a.report, a.gen_len)
        return 0
    cfg = TrainConfig()
    if a.shape:
        cfg.layers, cfg.experts, cfg.top_k, cfg.shared_experts = SHAPES[a.shape]
    for f in asdict(cfg):
        if getattr(a, f) is not None:
            setattr(cfg, f, getattr(a, f))
    corpus_path = Path(a.corpus or Path(a.out).with_suffix(".corpus.npz"))
    if a.prepare_only or not corpus_path.exists():
        prepare_corpus(cfg, corpus_path)
    if a.prepare_only:
        return 0
    train_and_trace(cfg, corpus_path, Path(a.out), a.device)
    report(a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
