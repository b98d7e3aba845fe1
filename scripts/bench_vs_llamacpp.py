"""offload against llama.cpp on this CPU: fully resident at equal precision, and under a real memory cap (issue 13).

Rows (each configuration in its own worker process, every configuration once per repeat in rotating order so
the two sides of a ratio alternate; medians with min-max ranges; the JSON keeps every raw sample):

- fully resident: offload bf16 (RAM tier, 100% budget) vs llama.cpp f16, offload int8 vs Q8_0, offload int4
  vs Q4_0. offload's int8 is per-channel symmetric; its int4 is int4-g128-asym, which its kernels hold as 4 bits
  per weight plus a float32 scale and a float32 scale x zero per 128 weights: 4.5 bits per weight, exactly Q4_0's
  (a 16-bit scale per 32 weights), so the two read the same bytes per weight (Q8_0 stores 32-blocks and is 6%
  larger than per-channel int8). With ``--gguf-quant experts`` (the default) Q8_0/Q4_0 quantize
  only the routed experts (``*_exps``) and keep attention, embeddings and lm_head in f16, as
  ``offload quantize`` does; ``--gguf-quant all`` is llama.cpp's own mixture (Q4_0 also gives lm_head Q6_K).
- memory-capped: each engine in its own memory cgroup (v2 where it has a memory controller, else v1; skipped
  with a message where neither can be created) whose limit is, for every engine of the row alike,

      cap(P) = P/100 * E + D + KV + R
        E  = expert bytes of the row's weights (the larger of the two engines' files)
        D  = every other weight byte (attention, routers, norms, embeddings, lm_head; the larger file's)
        KV = 2 * layers * kv_heads * head_dim * n_ctx * 2 bytes (16-bit K and V for n_ctx positions)
        R  = --runtime-mib: interpreter, libraries, activations and buffers

  llama.cpp runs with its default mmap (the page cache is charged to the cgroup, so what does not fit is read
  again from disk: it uses whatever its runtime leaves of the cap); transformers + accelerate disk offload gets
  max_memory cpu = cap - KV - R; offload's disk tier gets the largest expert budget that fits: its worker, once
  its libraries are loaded, reads its cgroup's usage U and takes cap - U - D - KV - M bytes of experts, M =
  --offload-margin-mib for activations, read staging and the allocator (the JSON records U and the budget).

Every run's model files are dropped from the page cache (posix_fadvise DONTNEED) just before its worker
starts, so no other process serves them from RAM. Per run: prefill and decode tok/s (decode = new_tokens - 1
tokens from the first new token to the last), load time, peak RSS, the cgroup's peak, major page faults and
bytes read from storage per decode token (/proc/self/io ``read_bytes``: what the process caused to be fetched
from the block layer, buffered readahead from its page faults and O_DIRECT reads alike, all threads; page-cache
hits are not counted), the machine's load while timing, and the greedy tokens (the same prompt ids for every
engine). llama.cpp's f16/Q8_0/Q4_0 arithmetic is not offload's bf16 one, so the first position where two
engines' tokens differ is informative only.

A STREAM-style triad (a = b + 3c, float32, ``--threads`` threads, arrays far larger than the caches; bytes
counted as STREAM does: two reads and one write per element) measures the machine's memory bandwidth before and
after the runs; each decode run's weight bytes per second (active weight bytes per token, i.e. non-expert weights
but the embedding table + top_k/experts of the expert bytes, times decode tok/s) is reported as a fraction of
the best triad.

    python scripts/bench_vs_llamacpp.py --converter PATH/llama.cpp/convert_hf_to_gguf.py       # default scale
    python scripts/bench_vs_llamacpp.py --converter ... --hidden 256 --intermediate 512 --layers 2 --repeats 1

The built model (default: the Mixtral shape of bench_decode.py) carries a SentencePiece ``tokenizer.model``
(llama.cpp's converter rejects custom byte-level BPE vocabularies but accepts SentencePiece), trained seeded on a
few Python stdlib modules, and the same tokenizer as ``tokenizer.json`` for transformers and offload. GGUF files
and offload's quantized checkpoints are cached under ``--work-dir`` by a hash of the checkpoint's files.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated

import bench_decode as bd
import typer
from common import atomic_path, machine_info, main, make_app, write_json, write_text
from timing import max_rss_bytes, rss_bytes, timed

from offload.errors import CheckpointError, ConfigError, OffloadError
from offload.experts.kernels.warmup import warm

LLAMA_CPP_PIN = "0.3.36"
INSTALL_COMMAND = (f'CMAKE_ARGS="-DLLAVA_BUILD=OFF" CMAKE_BUILD_PARALLEL_LEVEL=2 pip install '
                   f'"llama-cpp-python=={LLAMA_CPP_PIN}" sentencepiece')
find_spec = importlib.util.find_spec  # looked up at call time, so tests can replace it

# offload's name for the weights -> (the scheme `offload quantize` writes, None: the checkpoint itself; llama.cpp's)
FORMATS = {"bf16": (None, "f16"), "int8": ("int8", "q8_0"), "int4": ("int4-g128-asym", "q4_0"),
           # offload on llama.cpp's own GGUF file (the same bytes), computing from its blocks
           "gguf-q8_0": ("gguf", "q8_0"), "gguf-q4_0": ("gguf", "q4_0"), "gguf-q4_k_m": ("gguf", "q4_k_m")}
EXPERT_RE = re.compile(r"\.experts\.\d+\.|_exps\.")  # safetensors: one tensor per expert; GGUF: experts stacked
EMBED_RE = re.compile(r"embed_tokens\.|^token_embd\.")  # a token reads one row of it: not counted as read
CORPUS = ("argparse.py", "textwrap.py", "difflib.py", "dataclasses.py", "functools.py")  # ~300 KB of stdlib
CAP_FORMULA = "cap(P) = P/100 * E + D + KV + R"
INTERNAL = ("worker",)

app = make_app(__doc__.splitlines()[0], no_args_is_help=False)  # bare: the benchmark at its default scale


# -- options -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Options:
    """Every option of a run, in the order the JSON's ``params`` lists them (lists parsed)."""

    model: str | None
    work_dir: Path
    converter: Path | None
    gguf_quant: str
    hidden: int
    intermediate: int
    layers: int
    experts: int
    top_k: int
    heads: int
    kv_heads: int
    vocab: int
    init_range: float
    seed: int
    tokenizer_vocab: int
    prompt: str | None
    prompt_len: int
    new_tokens: int
    warmup_tokens: int
    repeats: int
    threads: int
    formats: list[str]
    caps: list[int]
    capped_formats: list[str]
    runtime_mib: int
    offload_margin_mib: int
    triad_mib: int
    triad_repeats: int
    timeout: float
    out: Path
    table: Path | None
    summarize: Path | None
    note: list[str]
    worker: str | None = None

    def params(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items() if k not in INTERNAL}


def parse_list(text: str, allowed: tuple[str, ...], what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in items if t not in allowed]
    if unknown:
        raise ConfigError(f"unknown {what} {unknown}", f"choose from {','.join(allowed)}")
    return items


def parse_caps(text: str) -> list[int]:
    caps = [t.strip().rstrip("%") for t in text.split(",") if t.strip()]
    if not all(c.isdigit() and 0 < int(c) < 100 for c in caps):
        raise ConfigError(f"--caps {text!r}: give percentages of the experts between 1 and 99, e.g. 50,25")
    return [int(c) for c in caps]


def require_llama_cpp() -> None:
    """Raise (one line, with the install command) unless llama_cpp can be imported; never imports it."""
    if find_spec("llama_cpp") is None:
        raise ConfigError("llama_cpp (llama-cpp-python) is not installed in this Python",
                          f"install it with: {INSTALL_COMMAND} (it builds llama.cpp from source, ~6-9 min on "
                          "2 cores), or: pip install -e '.[bench]' with the same CMAKE_ARGS")


# -- runs ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Run:
    """One configuration: an engine on one format, fully resident (cap None) or capped at ``cap`` % of the experts."""

    engine: str  # offload | llama.cpp | accelerate
    fmt: str     # offload's name for the weights (bf16, int8, int4); llama.cpp runs FORMATS[fmt][1]
    cap: int | None = None

    @property
    def weights(self) -> str:
        return FORMATS[self.fmt][1] if self.engine == "llama.cpp" else self.fmt

    @property
    def name(self) -> str:
        engine = "offload-disk" if self.engine == "offload" and self.cap else self.engine
        return f"{engine}-{self.weights}" + (f"@cap{self.cap}" if self.cap else "")


def plan_runs(formats: list[str], caps: list[int], capped_formats: list[str]) -> list[Run]:
    """Resident pairs per format, then per cap: offload and llama.cpp per capped format, accelerate at bf16."""
    runs = [Run(engine, f) for f in formats for engine in ("offload", "llama.cpp")]
    runs = [r for i, r in enumerate(runs) if r.name not in {x.name for x in runs[:i]}]  # int8 and gguf-q8_0 share one
    for cap in caps:
        for f in capped_formats:
            runs += [Run("offload", f, cap), Run("llama.cpp", f, cap)]
            if f == "bf16":  # transformers + accelerate runs the float checkpoint only
                runs.append(Run("accelerate", f, cap))
    return runs


def ratio_pairs(runs: list[Run]) -> list[tuple[Run, Run, str]]:
    """(offload's run, the other engine's, the issue's target) for every pair of a row."""
    pairs = []
    for r in runs:
        if r.engine != "offload":
            continue
        for engine in ("llama.cpp", "accelerate"):
            other = next((x for x in runs if x.name == Run(engine, r.fmt, r.cap).name), None)
            if other is not None:
                # issue 22's targets (resident, 50%), issue 25's at 25% against llama.cpp and 0.9x on Q4_K_M
                resident = ">= 0.9x" if r.fmt == "gguf-q4_k_m" and engine == "llama.cpp" else ">= 1.0x"
                target = {None: resident, 50: ">= 2x" if engine == "llama.cpp" else ">= 10x",
                          25: ">= 4x" if engine == "llama.cpp" else "report"}.get(r.cap, "report")
                pairs.append((r, other, target))
    return pairs


# -- checkpoint hashes and cached conversions ----------------------------------------------------
def checkpoint_files(path: Path) -> list[Path]:
    """Every file of a checkpoint folder but hidden ones, sorted (what its hash covers)."""
    return sorted(p for p in path.rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))


def checkpoint_hash(path: Path, memo: Path) -> str:
    """sha256 of the checkpoint's file names and contents; memoised in ``memo`` by (path, names, sizes, mtimes)
    so an unchanged checkpoint is not read again."""
    files = checkpoint_files(path)
    listing = [str(path.resolve())] + [[str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns]
                                       for p in files]
    key = hashlib.sha256(json.dumps(listing).encode()).hexdigest()
    known = json.loads(memo.read_text()) if memo.is_file() else {}
    if key in known:
        return known[key]
    digest = hashlib.sha256()
    for p in files:
        digest.update(str(p.relative_to(path)).encode() + b"\0")
        with open(p, "rb") as f:
            while chunk := f.read(16 * 2**20):
                digest.update(chunk)
        digest.update(b"\0")
    known[key] = digest.hexdigest()
    write_json(memo, known)
    return known[key]


def gguf_path(work_dir: Path, digest: str, gtype: str, scope: str = "experts") -> Path:
    """Where the GGUF of a checkpoint (by hash) in ``gtype`` is cached; ``all`` marks llama.cpp's own mixture."""
    suffix = "-all" if scope == "all" and gtype != "f16" else ""
    return work_dir / "gguf" / f"{digest[:16]}-{gtype}{suffix}.gguf"


def offload_path(work_dir: Path, model: Path, digest: str, fmt: str) -> Path:
    """offload's weights for ``fmt``: the checkpoint itself (bf16) or its `offload quantize` copy, cached by hash."""
    scheme = FORMATS[fmt][0]
    return model if scheme is None else work_dir / "quantized" / f"{digest[:16]}@{scheme}"


def tensors_sidecar(gguf: Path) -> Path:
    return gguf.with_name(gguf.name + ".tensors.json")


# -- weight bytes --------------------------------------------------------------------------------
def safetensors_sizes(path: Path) -> dict[str, int]:
    """name -> bytes of every tensor in a checkpoint folder's safetensors files (headers only)."""
    sizes = {}
    for file in sorted(path.glob("*.safetensors")):
        with open(file, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        sizes |= {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}
    return sizes


def weight_split(sizes: dict[str, int], top_k: int, experts: int) -> dict[str, int]:
    """Expert, other (dense) and embedding bytes, and the weight bytes one decode token reads: the dense weights
    but the embedding table (one row) plus top_k/experts of the expert bytes."""
    expert = sum(n for k, n in sizes.items() if EXPERT_RE.search(k))
    embedding = sum(n for k, n in sizes.items() if EMBED_RE.search(k))
    dense = sum(sizes.values()) - expert
    return {"expert_bytes": expert, "dense_bytes": dense, "embedding_bytes": embedding,
            "active_bytes_per_token": dense - embedding + expert * top_k // experts}


def kv_cache_bytes(config: dict, n_ctx: int, itemsize: int = 2) -> int:
    """K and V of every layer for ``n_ctx`` positions in a 16-bit type (llama.cpp's default f16, offload's bf16)."""
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * head_dim * n_ctx * itemsize


def context_length(prompt_len: int, new_tokens: int) -> int:
    """n_ctx given to llama.cpp (and counted for KV): prompt + new tokens, rounded up to 256 as llama.cpp pads."""
    return -(-(prompt_len + new_tokens) // 256) * 256


@dataclass(frozen=True)
class Cap:
    """The memory cgroup limit of one capped row, and what each engine is told to fit in it."""

    pct: int
    expert_bytes: int
    dense_bytes: int
    kv_bytes: int
    runtime_bytes: int

    @property
    def limit_bytes(self) -> int:
        return self.expert_bytes * self.pct // 100 + self.dense_bytes + self.kv_bytes + self.runtime_bytes

    @property
    def accelerate_max_memory(self) -> int:
        """accelerate's max_memory cpu: the weights it may keep in RAM (the cap less KV and runtime)."""
        return self.limit_bytes - self.kv_bytes - self.runtime_bytes

    def to_dict(self) -> dict:
        return {**asdict(self), "formula": CAP_FORMULA, "limit_bytes": self.limit_bytes,
                "accelerate_max_memory_bytes": self.accelerate_max_memory}


def offload_budget(limit: int, usage: int, dense: int, kv: int, margin: int) -> int:
    """The largest expert budget that fits a cap: what the cgroup has left once offload's libraries are loaded
    (``usage``), less the dense weights and KV cache it will allocate and a margin for activations and staging."""
    budget = limit - usage - dense - kv - margin
    if budget <= 0:
        raise ConfigError(f"a cap of {limit} bytes leaves no room for experts ({usage} used, {dense} dense, {kv} KV, "
                          f"{margin} margin)", "raise --runtime-mib or the cap")
    return budget


def row_cap(pct: int, splits: list[dict], kv: int, runtime: int) -> Cap:
    """One cap for every engine of a row: the larger file's expert and dense bytes, so neither is starved."""
    return Cap(pct, max(s["expert_bytes"] for s in splits), max(s["dense_bytes"] for s in splits), kv, runtime)


# -- /proc and cgroups ---------------------------------------------------------------------------
def parse_proc_cgroup(text: str) -> dict[str, str]:
    """/proc/self/cgroup -> controller -> path ("" for the v2 unified hierarchy)."""
    out = {}
    for line in text.splitlines():
        _, controllers, path = line.split(":", 2)
        for c in controllers.split(",") if controllers else [""]:
            out[c] = path
    return out


class CgroupUnavailable(OffloadError):
    """No memory cgroup can be created here (not root, no memory controller, a read-only hierarchy)."""


@dataclass(frozen=True)
class MemoryCgroup:
    """A memory cgroup of the v1 or v2 interface: created with a limit, joined by a worker, read, removed."""

    version: int
    path: Path

    def _files(self) -> dict[str, str]:
        if self.version == 1:
            return {"limit": "memory.limit_in_bytes", "swap": "memory.memsw.limit_in_bytes",
                    "usage": "memory.usage_in_bytes", "peak": "memory.max_usage_in_bytes",
                    "events": "memory.oom_control"}
        return {"limit": "memory.max", "swap": "memory.swap.max", "usage": "memory.current", "peak": "memory.peak",
                "events": "memory.events"}

    @classmethod
    def create(cls, version: int, parent: Path, name: str, limit: int) -> MemoryCgroup:
        group = cls(version, parent / name)
        group.path.mkdir()
        files = group._files()
        (group.path / files["limit"]).write_text(str(limit))
        swap = group.path / files["swap"]
        if swap.exists():  # no swapping out of the cap (v1: memory+swap = the limit; v2: no swap)
            swap.write_text(str(limit) if version == 1 else "0")
        return group

    def join(self) -> None:
        """Move the calling process into the group (a worker's preexec_fn: before it runs anything)."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def usage(self) -> int:
        """Bytes charged to the group now (its processes' memory and the page cache they brought in)."""
        return int((self.path / self._files()["usage"]).read_text())

    def stats(self) -> dict:
        files = self._files()
        read = lambda name: (self.path / name).read_text() if (self.path / name).exists() else ""  # noqa: E731
        stat = dict(line.split() for line in read("memory.stat").splitlines() if len(line.split()) == 2)
        keep = ("total_cache", "total_rss", "total_mapped_file", "total_pgmajfault", "file", "anon", "pgmajfault")
        events = dict(line.split() for line in read(files["events"]).splitlines() if len(line.split()) == 2)
        peak = read(files["peak"]).strip()
        return {"version": self.version, "path": str(self.path), "limit_bytes": _int(read(files["limit"]).strip()),
                "peak_bytes": _int(peak), "oom_kill": _int(events.get("oom_kill", "")),
                "failcnt": _int(read("memory.failcnt").strip()), "stat": {k: int(stat[k]) for k in keep if k in stat}}

    def remove(self) -> None:
        for _ in range(50):  # a just-exited worker may still be leaving the group
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)
        self.path.rmdir()


def _int(text: str) -> int | None:
    return int(text) if text.isdigit() else None


def cgroup_parents(root: Path = Path("/sys/fs/cgroup"), own: str | None = None) -> list[tuple[int, Path]]:
    """Where this process may create a memory cgroup, v2 first (where its memory controller is usable), then v1;
    inside this process's own groups, so that any limit above still applies."""
    groups = parse_proc_cgroup(own if own is not None else Path("/proc/self/cgroup").read_text())
    found = []
    for mount in (root, root / "unified"):  # pure v2, or the unified hierarchy of a hybrid setup
        if "" in groups and (mount / "cgroup.controllers").is_file():
            parent = mount / groups[""].lstrip("/")
            if "memory" in (parent / "cgroup.controllers").read_text().split():
                found.append((2, parent))
    if "memory" in groups and (root / "memory").is_dir():
        found.append((1, root / "memory" / groups["memory"].lstrip("/")))
    return found


def probe_cgroup(limit: int = 2**30) -> tuple[int, Path]:
    """A parent in which a memory cgroup can be created, limited and removed; CgroupUnavailable with every reason."""
    reasons = []
    for version, parent in cgroup_parents():
        try:
            if version == 2:
                (parent / "cgroup.subtree_control").write_text("+memory")
            MemoryCgroup.create(version, parent, f"bench-vs-llamacpp-probe-{os.getpid()}", limit).remove()
            return version, parent
        except OSError as e:
            reasons.append(f"v{version} at {parent}: {e.strerror or e}")
    raise CgroupUnavailable("no memory cgroup can be created here: " + ("; ".join(reasons) or "no memory controller"),
                            "run as root on a kernel with the memory controller, or drop the capped rows (--caps '')")


# -- the triad -----------------------------------------------------------------------------------
def triad_bytes(n: int, itemsize: int) -> int:
    """Bytes one triad a = b + s*c moves, counted as STREAM does: read b and c, write a."""
    return 3 * n * itemsize


def triad_rates(n: int, itemsize: int, times: list[float]) -> dict:
    moved = triad_bytes(n, itemsize)
    return {"n": n, "itemsize": itemsize, "bytes_per_iteration": moved, "times_s": times,
            "best_bytes_per_s": moved / min(times), "median_bytes_per_s": moved / statistics.median(times)}


def run_triad(n: int, repeats: int) -> dict:
    """STREAM's triad with torch on float32 arrays of ``n`` elements (torch's current threads); checked."""
    import torch

    b, c = torch.full((n,), 1.0), torch.full((n,), 2.0)
    a = torch.empty(n)
    torch.add(b, c, alpha=3.0, out=a)  # first touch of a's pages: not timed
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.add(b, c, alpha=3.0, out=a)
        times.append(time.perf_counter() - t0)
    if not bool((a == 7.0).all()):
        raise RuntimeError("triad produced wrong values")
    return triad_rates(n, a.element_size(), times) | {"threads": torch.get_num_threads()}


# -- the bench model and its SentencePiece tokenizer -----------------------------------------------
def corpus_lines() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return [line for name in CORPUS for line in (stdlib / name).read_text().splitlines() if line.strip()]


def train_sentencepiece(vocab_size: int, seed: int) -> bytes:
    """A SentencePiece unigram model with byte fallback trained on CORPUS: deterministic (seeded, one thread)."""
    import io

    import sentencepiece as spm

    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus_lines()), model_writer=model, vocab_size=vocab_size, model_type="unigram",
        byte_fallback=True, num_threads=1, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, normalization_rule_name="identity",
        remove_extra_whitespaces=False, hard_vocab_limit=False, minloglevel=2)
    return model.getvalue()


def tokenizers_twin(model_file: Path):
    """The SentencePiece model as a `tokenizers` Tokenizer (what offload and transformers read): the same pieces
    and scores in a Unigram model, whitespace as SentencePiece escapes it, BOS prepended. The two encode alike
    (tested), but for text that spells a special token ("<s>"), which `tokenizers` matches and SentencePiece not."""
    import sentencepiece as spm
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    tok = Tokenizer(models.Unigram(vocab, unk_id=sp.unk_id(), byte_fallback=True))
    # SentencePiece's dummy prefix and whitespace escaping, then its split before every "▁" (split_by_whitespace)
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(sp.id_to_piece(i), special=True) for i in (0, 1, 2)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", sp.bos_id())])
    return tok


def write_tokenizer(out: Path, vocab_size: int, seed: int) -> None:
    """tokenizer.model (llama.cpp's converter), tokenizer.json + tokenizer_config.json (offload, transformers)."""
    (out / "tokenizer.model").write_bytes(train_sentencepiece(vocab_size, seed))
    tok = tokenizers_twin(out / "tokenizer.model")
    tok.save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
              "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False, "model_max_length": 4096}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def model_dir(opts: Options) -> Path:
    if opts.model:
        from offload.checkpoint.locate import resolve_model_dir

        return resolve_model_dir(opts.model)
    built = bd.model_dir(opts)  # bench_decode's name for the same shape, plus the tokenizer's size
    return built.with_name(f"{built.name}-spm{opts.tokenizer_vocab}")


def build_model(opts: Options, out: Path) -> None:
    """bench_decode's random Mixtral, then the tokenizer, in a staging folder renamed when complete."""
    import shutil

    stage = out.with_name(out.name + ".staging")
    shutil.rmtree(stage, ignore_errors=True)
    bd.build_model(opts, stage)
    write_tokenizer(stage, opts.tokenizer_vocab, opts.seed)
    stage.rename(out)


def ensure_model(opts: Options) -> Path:
    path = model_dir(opts)
    if (path / "config.json").is_file():
        return path
    if opts.model:
        raise CheckpointError(f"{path} holds no config.json", "give a Mixtral-shaped checkpoint folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    bd.log(f"building {path.name} (cached for later runs) ...")
    run_task(opts, {"task": "build"}, what=f"building {path}")
    return path


# -- conversions ---------------------------------------------------------------------------------
def converter_of(opts: Options) -> Path:
    converter = opts.converter or (Path(os.environ["LLAMA_CPP_CONVERTER"]) if "LLAMA_CPP_CONVERTER" in os.environ
                                   else None)
    if converter is None or not converter.is_file():
        raise ConfigError(f"llama.cpp's converter is needed and {converter or 'none'} was given",
                          "pass --converter PATH/convert_hf_to_gguf.py (in llama-cpp-python's sdist under "
                          "vendor/llama.cpp) or set LLAMA_CPP_CONVERTER")
    return converter


def convert_f16(opts: Options, model: Path, out: Path) -> None:
    """convert_hf_to_gguf.py --outtype f16, with the gguf package it vendors first on PYTHONPATH (PyPI's fails)."""
    converter = converter_of(opts)
    gguf_py = str(converter.parent / "gguf-py")
    env = {**bd.worker_env(opts), "PYTHONPATH": os.pathsep.join(filter(None, [gguf_py, os.environ.get("PYTHONPATH")]))}
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with atomic_path(out) as tmp:
        cmd = [sys.executable, str(converter), str(model), "--outtype", "f16", "--outfile", str(tmp)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if proc.returncode != 0:
            bd.log(proc.stderr[-4000:])
            raise CheckpointError(f"convert_hf_to_gguf.py failed on {model} (exit {proc.returncode})", "see above")
    bd.log(f"converted {model.name} -> {out.name} in {time.time() - t0:.0f}s")


def ensure_ggufs(opts: Options, model: Path, digest: str, gtypes: list[str]) -> dict[str, Path]:
    """The cached GGUFs of ``model`` (f16 by the converter, the rest quantized from it), each with a sidecar of
    its tensors' sizes and types."""
    paths = {g: gguf_path(opts.work_dir, digest, g, opts.gguf_quant) for g in gtypes}
    f16 = gguf_path(opts.work_dir, digest, "f16")
    if not f16.is_file():
        convert_f16(opts, model, f16)
    for g in gtypes:
        if not paths[g].is_file():
            bd.log(f"quantizing {f16.name} -> {g} ({opts.gguf_quant}) ...")
            run_task(opts, {"task": "gguf-quantize", "src": str(f16), "dst": str(paths[g]), "gtype": g,
                            "scope": opts.gguf_quant, "threads": opts.threads}, what=f"quantizing to {g}")
    for path in {f16, *paths.values()}:
        if not tensors_sidecar(path).is_file():
            gguf_py = str(converter_of(opts).parent / "gguf-py")
            found = run_task(opts, {"task": "gguf-tensors", "gguf": str(path), "gguf_py": gguf_py},
                             what=f"reading {path.name}")
            write_json(tensors_sidecar(path), found["tensors"])
    return paths


def ensure_offload_weights(opts: Options, model: Path, digest: str, formats: list[str]) -> dict[str, Path]:
    paths = {f: offload_path(opts.work_dir, model, digest, f) for f in formats}
    for f, path in paths.items():
        if not (path / "config.json").is_file():
            bd.log(f"offload quantize {model.name} -> {FORMATS[f][0]} (cached) ...")
            run_task(opts, {"task": "offload-quantize", "src": str(model), "dst": str(path),
                            "scheme": FORMATS[f][0]}, what=f"offload quantize {FORMATS[f][0]}")
    return paths


# -- workers -------------------------------------------------------------------------------------
def run_offload(task: dict) -> dict:
    import torch

    import offload

    rss0 = rss_bytes()
    where: dict = {"offload_to": "ram", "expert_budget": "100%"}
    if task["cap"]:
        warm()  # the kernels' ~100 MB are in the cgroup's usage before the budget is sized from it
        usage = MemoryCgroup(task["cgroup"][0], Path(task["cgroup"][1])).usage() if task.get("cgroup") else 0
        budget = offload_budget(task["cap_bytes"], usage, task["dense_bytes"], task["kv_bytes"], task["margin_bytes"])
        where = {"offload_to": "disk", "expert_budget": f"{budget}B", "cgroup_usage_before_load_bytes": usage}
    t0 = time.perf_counter()
    m = offload.from_pretrained(task["weights"], device="cpu", dtype="bfloat16", policy="lru", predictor="none",
                                offload_to=where["offload_to"], expert_budget=where["expert_budget"])
    load_s = time.perf_counter() - t0
    ids = torch.tensor([task["ids"]])

    def generate(n: int, streamer=None) -> list[int]:
        out = m.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=[], streamer=streamer)
        return out[0, ids.shape[1]:].tolist()

    if not task["cap"]:  # fully resident, as llama.cpp's weights are after its load: every expert in its slot
        m.cache.warm(sorted(m.plan.experts))  # (else a 32-expert model's first uses are copies in the timed tokens)
    generate(task["warmup_tokens"])  # kernels, allocator; the cache keeps what the warm-up loaded
    m.stats.reset()
    sample = timed(lambda clock: generate(task["new_tokens"], clock), ids.shape[1])
    total = m.stats.to_dict()["total"]
    return {**sample, "load_model_s": load_s, "rss_before_load_bytes": rss0, **where,
            "num_slots": m.cache.num_slots, "total_experts": m.spec.total_experts, "slot_nbytes": m.cache.slot_nbytes,
            "expert_format": m.plan.expert_format.name,
            "cache": {k: total[k] for k in ("hits", "misses", "bytes_loaded", "load_time_s")}}


def run_accelerate(task: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    rss0 = rss_bytes()
    folder = Path(task["offload_folder"])
    kwargs = {"dtype": torch.bfloat16, "device_map": "auto", "max_memory": {"cpu": task["accelerate_max_memory"]},
              "offload_folder": str(folder)}
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(task["weights"], **kwargs).eval()
    load_s = time.perf_counter() - t0
    placement, _ = bd.accelerate_placement(model, Path(task["weights"]), folder)
    ids = torch.tensor([task["ids"]])

    def generate(n: int, streamer=None) -> list[int]:
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0,
                             max_new_tokens=n, min_new_tokens=n, streamer=streamer)
        return out[0, ids.shape[1]:].tolist()

    with torch.inference_mode():
        generate(task["warmup_tokens"])
        sample = timed(lambda clock: generate(task["new_tokens"], clock), ids.shape[1])
    return {**sample, "load_model_s": load_s, "rss_before_load_bytes": rss0, **placement,
            "max_memory_cpu_bytes": task["accelerate_max_memory"]}


def worker_main(opts: Options) -> None:
    """Do one task (``--worker JSON``) and print its result as one JSON line on stdout."""
    import torch

    torch.set_num_threads(opts.threads)
    task = json.loads(opts.worker)
    kind = task["task"]
    if kind == "build":
        build_model(opts, model_dir(opts))
        result = {}
    elif kind == "offload-quantize":
        from offload.experts.quant import parse_scheme
        from offload.tools.quantize import quantize_checkpoint

        Path(task["dst"]).parent.mkdir(parents=True, exist_ok=True)
        quantize_checkpoint(task["src"], task["dst"], parse_scheme(task["scheme"]))
        result = {}
    elif kind == "triad":
        result = run_triad(task["n"], task["repeats"])
    else:
        load_before = os.getloadavg()
        result = {"offload": run_offload, "accelerate": run_accelerate}[task["engine"]](task)
        result |= {"threads": torch.get_num_threads(), "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
                   "rss_after_bytes": rss_bytes()}
    result["max_rss_bytes"] = max_rss_bytes()
    print(json.dumps(result), flush=True)


# -- driver --------------------------------------------------------------------------------------
def run_task(opts: Options, task: dict, group: MemoryCgroup | None = None, what: str = "") -> dict:
    """One worker process for ``task`` (in ``group`` from its first instruction); its JSON line, or an error
    sample when ``what`` is empty (a timed run), else a CheckpointError (a preparation step must succeed).

    llama.cpp's tasks run in llamacpp_worker.py, which never imports torch; the others re-run this script.
    """
    if task.get("engine") == "llama.cpp" or task["task"].startswith("gguf-"):
        cmd = [sys.executable, str(Path(__file__).with_name("llamacpp_worker.py")), json.dumps(task)]
    else:
        cmd = [sys.executable, __file__, *sys.argv[1:], "--worker", json.dumps(task)]
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=bd.worker_env(opts), timeout=opts.timeout,
                              check=False, preexec_fn=group.join if group else None)
    except subprocess.TimeoutExpired:
        proc = subprocess.CompletedProcess(cmd, -1, "", f"timed out after {opts.timeout:.0f}s")
    if proc.returncode != 0:
        bd.log(proc.stderr[-3000:])
        if what:
            raise CheckpointError(f"{what} failed (exit {proc.returncode})", "see the messages above")
        return {"error": f"worker exited {proc.returncode}", "stderr_tail": proc.stderr[-2000:]}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["worker_wall_s"] = round(time.time() - t0, 2)
    return result


def run_files(run: Run, weights: Path) -> list[Path]:
    """The model files a run reads (dropped from the page cache before it starts)."""
    return [weights] if run.engine == "llama.cpp" else sorted(weights.glob("*.safetensors"))


def run_one(opts: Options, run: Run, task: dict, files: list[Path], cgroup: tuple[int, Path] | None) -> dict:
    """Drop ``files`` from the page cache, then time ``run`` in a fresh worker (in its own cgroup when capped)."""
    bd.PageDropper({"model": files}, 0).drop_now()
    if run.engine == "accelerate":  # each run writes its own offload folder
        folder = Path(task["offload_folder"])
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.iterdir():
            old.unlink()
    group = None
    if run.cap and cgroup:
        group = MemoryCgroup.create(*cgroup, f"bench-vs-llamacpp-{os.getpid()}-{time.time_ns()}", task["cap_bytes"])
    try:
        sample = run_task(opts, task | ({"cgroup": [group.version, str(group.path)]} if group else {}), group)
    finally:
        if group:
            stats = group.stats()
            group.remove()
    if group:
        sample["cgroup"] = stats
        if sample.get("error") and stats.get("oom_kill"):
            sample["error"] += f" (the cgroup's OOM killer ran {stats['oom_kill']}x)"
    return sample


def prompt_ids(opts: Options, model: Path, vocab: int) -> list[int]:
    """The prompt every engine gets: ``--prompt`` with the checkpoint's tokenizer.json, else seeded random ids."""
    if opts.prompt:
        from tokenizers import Tokenizer

        if not (model / "tokenizer.json").is_file():
            raise CheckpointError(f"{model} has no tokenizer.json", "drop --prompt to time random token ids")
        return Tokenizer.from_file(str(model / "tokenizer.json")).encode(opts.prompt).ids
    import random

    rng = random.Random(opts.seed + 1)
    return [rng.randrange(3, vocab) for _ in range(opts.prompt_len)]


@dataclass
class Setup:
    """What a run of the benchmark prepared: the model, each run's weights and worker task, the caps."""

    model: Path
    digest: str
    config: dict
    weights: dict[str, Path]     # run name -> weights
    tasks: dict[str, dict]       # run name -> worker task
    splits: dict[str, dict]      # run name -> weight_split of its weights
    caps: dict[str, dict]        # "fmt@capP" -> Cap.to_dict()
    cgroup: tuple[int, Path] | None
    skipped: list[str]


def splits_of(setup_weights: dict[str, Path], runs: list[Run], config: dict) -> dict[str, dict]:
    k, e = config["num_experts_per_tok"], config["num_local_experts"]
    out = {}
    for r in runs:
        w = setup_weights[r.name]
        if w.suffix == ".gguf":
            sizes = {n: t["bytes"] for n, t in json.loads(tensors_sidecar(w).read_text()).items()}
        else:
            sizes = safetensors_sizes(w)
        out[r.name] = weight_split(sizes, k, e)
    return out


def make_tasks(opts: Options, runs: list[Run], setup: Setup, ids: list[int], n_ctx: int) -> None:
    """Each run's worker task; capped runs get their row's cap (computed once per format and cap)."""
    kv = kv_cache_bytes(setup.config, n_ctx)
    for r in runs:
        task = {"task": "run", "engine": r.engine, "fmt": r.fmt, "cap": r.cap, "weights": str(setup.weights[r.name]),
                "ids": ids, "new_tokens": opts.new_tokens, "warmup_tokens": opts.warmup_tokens,
                "threads": opts.threads, "n_ctx": n_ctx}
        if r.cap:
            row = [setup.splits[x.name] for x in runs if x.fmt == r.fmt and x.cap == r.cap]
            cap = row_cap(r.cap, row, kv, opts.runtime_mib * 2**20)
            setup.caps[f"{r.fmt}@cap{r.cap}"] = cap.to_dict()
            task |= {"cap_bytes": cap.limit_bytes, "dense_bytes": cap.dense_bytes, "kv_bytes": kv,
                     "margin_bytes": opts.offload_margin_mib * 2**20,
                     "accelerate_max_memory": cap.accelerate_max_memory,
                     "offload_folder": str(opts.work_dir / f"accelerate-offload-{setup.digest[:16]}")}
            if r.engine == "llama.cpp":  # its repacked weights are anonymous memory a cap cannot page out: it runs
                task["repack"] = False    # capped only as `--no-repack`, its weights the mmapped file's pages
        setup.tasks[r.name] = task


def prepare(opts: Options, runs: list[Run]) -> tuple[Setup, list[Run]]:
    """Build or find the model, convert and quantize it (cached), find a cgroup, and write every run's task."""
    model = ensure_model(opts)
    digest = checkpoint_hash(model, opts.work_dir / "checkpoint-hashes.json")
    config = json.loads((model / "config.json").read_text())
    skipped = []
    cgroup = None
    if any(r.cap for r in runs):
        try:
            cgroup = probe_cgroup()
        except CgroupUnavailable as e:
            skipped = [f"capped rows skipped: {e}"]
            bd.log(skipped[0])
            runs = [r for r in runs if not r.cap]
    formats = sorted({r.fmt for r in runs})
    ggufs = ensure_ggufs(opts, model, digest, sorted({FORMATS[f][1] for f in formats}))
    ours = ensure_offload_weights(opts, model, digest, [f for f in formats if FORMATS[f][0] != "gguf"])
    ours |= {f: ggufs[FORMATS[f][1]] for f in formats if FORMATS[f][0] == "gguf"}
    weights = {r.name: ggufs[r.weights] if r.engine == "llama.cpp" else ours[r.fmt] for r in runs}
    setup = Setup(model, digest, config, weights, {}, splits_of(weights, runs, config), {}, cgroup, skipped)
    ids = prompt_ids(opts, model, config["vocab_size"])
    make_tasks(opts, runs, setup, ids, context_length(len(ids), opts.new_tokens))
    return setup, runs


def drive(opts: Options) -> None:
    """Prepare, measure the triad, time every run ``--repeats`` times in rotating order, measure the triad again;
    the JSON is written after every sample, the Markdown table at the end."""
    require_llama_cpp()
    t_start = time.time()
    runs = plan_runs(opts.formats, opts.caps, opts.capped_formats)
    setup, runs = prepare(opts, runs)
    by_name = {r.name: r for r in runs}
    before = bd.busy_snapshot()
    bd.log(f"model {setup.model}; {len(runs)} configurations x {opts.repeats} repeats; load {before['loadavg']}")
    triad_task = {"task": "triad", "n": opts.triad_mib * 2**20 // 4, "repeats": opts.triad_repeats}
    triads = [run_task(opts, triad_task, what="the triad")]
    bd.log(f"triad {triads[0]['best_bytes_per_s'] / 1e9:.1f} GB/s")
    samples: list[dict] = []
    plan = bd.schedule(list(by_name), opts.repeats)
    for rep, name in plan:
        run = by_name[name]
        s = run_one(opts, run, setup.tasks[name], run_files(run, setup.weights[name]), setup.cgroup)
        s |= {"config": name, "repeat": rep,
              "active_weight_bytes_per_token": setup.splits[name]["active_bytes_per_token"]}
        samples.append(s)
        bd.log(f"  repeat {rep} {name:26s} " + (s.get("error") or f"{s['decode_tokens_per_s']:.2f} tok/s decode, "
                                                f"{s['prefill_tokens_per_s']:.1f} prefill"))
        result = report(opts, setup, runs, samples, triads, before, t_start, complete=False)
    triads.append(run_task(opts, triad_task, what="the triad"))
    result = report(opts, setup, runs, samples, triads, before, t_start, complete=True)
    text = table(result)
    write_text(table_path(opts), text + "\n")
    print(text)
    bd.log(f"wrote {opts.out} and {table_path(opts)} in {result['wall_time_s']:.0f}s")


def table_path(opts: Options) -> Path:
    return opts.table or opts.out.with_suffix(".md")


def report(opts: Options, setup: Setup, runs: list[Run], samples: list[dict], triads: list[dict], before: dict,
           t_start: float, complete: bool) -> dict:
    """The JSON so far (written to ``--out`` atomically): machine, versions, parameters, setup, samples, summary."""
    bandwidth = max(t["best_bytes_per_s"] for t in triads)
    result = {
        "benchmark": "bench_vs_llamacpp", "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "complete": complete, "wall_time_s": round(time.time() - t_start, 1),
        "machine": machine_info("transformers", "accelerate", "llama_cpp_python", "sentencepiece"),
        "busy_before": before, "busy_after": bd.busy_snapshot(), "params": opts.params(),
        "model": {"path": str(setup.model), "sha256": setup.digest, "config": setup.config,
                  "weights": {n: str(p) for n, p in setup.weights.items()}, "weight_bytes": setup.splits},
        "runs": [asdict(r) | {"name": r.name} for r in runs], "caps": setup.caps, "cap_formula": CAP_FORMULA,
        "cgroup": {"version": setup.cgroup[0], "parent": str(setup.cgroup[1])} if setup.cgroup else None,
        "triad": triads, "bandwidth_bytes_per_s": bandwidth, "skipped": setup.skipped,
        "method": __doc__, "notes": opts.note,
        "samples": samples, "summary": summarize(samples, runs, opts.repeats, bandwidth),
    }
    write_json(opts.out, result)
    return result


# -- summary and table ---------------------------------------------------------------------------
def first_difference(a: list[int], b: list[int]) -> int | None:
    """The first position where two token lists differ (the shorter one's end counts), None when equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def _row(ss: list[dict], failed: int, bandwidth: float) -> dict:
    mr = bd.median_range
    row = {"failed": failed, "n": len(ss)}
    if not ss:
        return row
    keys = ("decode_tokens_per_s", "prefill_tokens_per_s", "load_model_s", "max_rss_bytes",
            "decode_read_bytes_per_token", "decode_major_faults_per_token")
    row |= {k: mr([s[k] for s in ss if s.get(k) is not None]) for k in keys}
    row["cgroup_peak_bytes"] = mr([s["cgroup"]["peak_bytes"] for s in ss if (s.get("cgroup") or {}).get("peak_bytes")])
    row["weight_bytes_per_s"] = mr([s["active_weight_bytes_per_token"] * s["decode_tokens_per_s"] for s in ss])
    row["fraction_of_bandwidth"] = mr([s["active_weight_bytes_per_token"] * s["decode_tokens_per_s"] / bandwidth
                                       for s in ss])
    row["other_processes_cores"] = mr([s["busy"]["other_processes_cores"] for s in ss])
    row["tokens_stable"] = all(s["new_token_ids"] == ss[0]["new_token_ids"] for s in ss)
    return row


def summarize(samples: list[dict], runs: list[Run], repeats: int, bandwidth: float) -> dict:
    """Per configuration medians [min-max], and per pair the ratio paired per repeat and where tokens differ."""
    ok = [s for s in samples if "error" not in s]
    by = {r.name: [s for s in ok if s["config"] == r.name] for r in runs}
    summary: dict = {"configs": {}, "ratios": {}}
    for name, ss in by.items():
        failed = sum(1 for s in samples if s["config"] == name and "error" in s)
        summary["configs"][name] = _row(ss, failed, bandwidth)
    for ours, theirs, target in ratio_pairs(runs):
        a, b = by[ours.name], by[theirs.name]
        ratio = bd.paired_ratio(a, b, repeats) | {"target": target}
        if a and b:
            diff = first_difference(a[0]["new_token_ids"], b[0]["new_token_ids"])
            ratio["first_token_difference"] = diff
            ratio["tokens_compared"] = min(len(a[0]["new_token_ids"]), len(b[0]["new_token_ids"]))
            margins = b[0].get("top2_margins") or []
            if diff is not None and diff < len(margins):  # how close llama.cpp's own choice was there
                ratio["llama_cpp_top2_margin_there"] = margins[diff]
        summary["ratios"][f"{ours.name} / {theirs.name}"] = ratio
    return summary


def _gib(d: dict) -> str:
    return bd.fmt_range(d, 2**-30)


def _resident_lines(rows: dict, names: list[str]) -> list[str]:
    lines = ["| configuration | decode tok/s | prefill tok/s | weight GB/s (share of triad) | load s | peak RSS GiB "
             "| other procs' cores |", "|---|---|---|---|---|---|---|"]
    for n in names:
        r = rows[n]
        if not r.get("n"):
            lines.append(f"| {n} | failed ({r['failed']}) | | | | | |")
            continue
        share = bd.fmt_range(r["fraction_of_bandwidth"], 100, 0)
        lines.append(f"| {n} | {bd.fmt_range(r['decode_tokens_per_s'])} | "
                     f"{bd.fmt_range(r['prefill_tokens_per_s'], 1, 1)} | "
                     f"{bd.fmt_range(r['weight_bytes_per_s'], 1e-9)} ({share}%) | "
                     f"{bd.fmt_range(r['load_model_s'], 1, 1)} | {_gib(r['max_rss_bytes'])} | "
                     f"{bd.fmt_range(r['other_processes_cores'])} |")
    return lines


def _capped_lines(rows: dict, names: list[str], caps: dict, runs: dict) -> list[str]:
    lines = ["| configuration | cap GiB | decode tok/s | prefill tok/s | peak RSS GiB | cgroup peak GiB "
             "| major faults / token | MiB read / token | weight GB/s (share of triad) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for n in names:
        r, run = rows[n], runs[n]
        cap = caps.get(f"{run['fmt']}@cap{run['cap']}", {}).get("limit_bytes", 0) / 2**30
        if not r.get("n"):
            lines.append(f"| {n} | {cap:.2f} | failed ({r['failed']}) | | | | | | |")
            continue
        share = bd.fmt_range(r["fraction_of_bandwidth"], 100, 0)
        lines.append(f"| {n} | {cap:.2f} | {bd.fmt_range(r['decode_tokens_per_s'])} | "
                     f"{bd.fmt_range(r['prefill_tokens_per_s'], 1, 1)} | {_gib(r['max_rss_bytes'])} | "
                     f"{_gib(r['cgroup_peak_bytes'])} | {bd.fmt_range(r['decode_major_faults_per_token'], 1, 1)} | "
                     f"{bd.fmt_range(r['decode_read_bytes_per_token'], 2**-20, 1)} | "
                     f"{bd.fmt_range(r['weight_bytes_per_s'], 1e-9)} ({share}%) |")
    return lines


def _ratio_lines(ratios: dict) -> list[str]:
    lines = ["| decode ratio (paired per repeat) | median [min–max] | of medians | target | first differing token |",
             "|---|---|---|---|---|"]
    for k, v in ratios.items():
        of = f"{v['of_medians']:.2f}x" if "of_medians" in v else "n/a"
        paired = f"{bd.fmt_range(v)}x" if v.get("n") else "n/a"
        diff = v.get("first_token_difference", "n/a")
        diff = f"none in {v['tokens_compared']}" if diff is None else diff
        if "llama_cpp_top2_margin_there" in v:
            diff = f"{diff} (llama.cpp's top-2 logit gap there: {v['llama_cpp_top2_margin_there']:.3g})"
        lines.append(f"| {k} | {paired} | {of} | {v['target']} | {diff} |")
    return lines


def table(result: dict) -> str:
    """Markdown: the triad, the resident rows, the capped rows, the paired ratios, the notes."""
    rows, runs = result["summary"]["configs"], {r["name"]: r for r in result["runs"]}
    bw = [f"{t['best_bytes_per_s'] / 1e9:.1f}" for t in result["triad"]]
    head = [f"Memory bandwidth (triad, best of {result['params']['triad_repeats']}, before/after the runs): "
            f"{' / '.join(bw)} GB/s. Caps: {result['cap_formula']}, R = {result['params']['runtime_mib']} MiB.", ""]
    resident = [n for n in rows if runs[n]["cap"] is None]
    capped = [n for n in rows if runs[n]["cap"] is not None]
    lines = head[:-1]
    if resident:
        lines += [""] + _resident_lines(rows, resident)
    if capped:
        lines += [""] + _capped_lines(rows, capped, result["caps"], runs)
    lines += [""] + _ratio_lines(result["summary"]["ratios"])
    lines += [f"\n{s}" for s in result.get("skipped", [])] + [f"\nNote: {n}" for n in result.get("notes", [])]
    return "\n".join(lines)


def resummarize(path: Path, table_out: Path | None) -> None:
    result = json.loads(path.read_text())
    runs = [Run(r["engine"], r["fmt"], r["cap"]) for r in result["runs"]]
    result["summary"] = summarize(result["samples"], runs, result["params"]["repeats"],
                                  result["bandwidth_bytes_per_s"])
    write_json(path, result)
    text = table(result)
    write_text(table_out or path.with_suffix(".md"), text + "\n")
    print(text)


# -- command -------------------------------------------------------------------------------------
@app.command()
def bench(
    model: Annotated[str | None, typer.Option(help="A Mixtral-shaped checkpoint folder with a SentencePiece "
                                                   "tokenizer.model (else one is built).")] = None,
    work_dir: Annotated[Path, typer.Option(help="Built models, GGUFs, quantized copies, offload folders.")] = Path(
        "/tmp/offload-bench"),
    converter: Annotated[Path | None, typer.Option(help="llama.cpp's convert_hf_to_gguf.py (in llama-cpp-python's "
                                                        "sdist, vendor/llama.cpp; default $LLAMA_CPP_CONVERTER); "
                                                        "needed until the GGUFs are cached.")] = None,
    gguf_quant: Annotated[str, typer.Option(help="Q8_0/Q4_0 of the experts only (experts: the rest f16, as offload "
                                                 "quantize) or of all 2-D tensors (all: llama.cpp's mixture).")
                          ] = "experts",
    hidden: Annotated[int, typer.Option(help="Built model: hidden size.")] = 1024,
    intermediate: Annotated[int, typer.Option(help="Built model: expert intermediate size.")] = 3584,
    layers: Annotated[int, typer.Option(help="Built model: decoder layers.")] = 8,
    experts: Annotated[int, typer.Option(help="Built model: experts per layer.")] = 8,
    top_k: Annotated[int, typer.Option(help="Built model: experts per token.")] = 2,
    heads: Annotated[int, typer.Option(help="Built model: attention heads.")] = 16,
    kv_heads: Annotated[int, typer.Option(help="Built model: key/value heads.")] = 4,
    vocab: Annotated[int, typer.Option(help="Built model: vocabulary size.")] = 32000,
    init_range: Annotated[float, typer.Option(help="Built model: initializer_range.")] = 0.1,
    seed: Annotated[int, typer.Option(help="Seed of the built model, its tokenizer and the random prompt.")] = 0,
    tokenizer_vocab: Annotated[int, typer.Option(help="Built model: at most this many SentencePiece pieces (the "
                                                      "rest of the vocabulary is padding the converter names [PADn]).")
                               ] = 4000,
    prompt: Annotated[str | None, typer.Option(help="Prompt text (the checkpoint's tokenizer.json) instead of "
                                                    "random ids.")] = None,
    prompt_len: Annotated[int, typer.Option(help="Random prompt's tokens (without --prompt).")] = 32,
    new_tokens: Annotated[int, typer.Option(help="Greedy tokens; decode = all but the first.")] = 64,
    warmup_tokens: Annotated[int, typer.Option(help="Untimed greedy tokens before the timed run.")] = 4,
    repeats: Annotated[int, typer.Option(help="Samples per configuration, in rotating order.")] = 5,
    threads: Annotated[int, typer.Option(help="Threads of every engine and of the triad.")] = 2,
    formats: Annotated[str, typer.Option(help="Resident pairs: bf16 (vs f16), int8 (vs Q8_0), int4 (vs Q4_0).")
                       ] = "bf16,int8,int4",
    caps: Annotated[str, typer.Option(help="Capped rows at these % of the expert bytes ('' for none).")] = "50,25",
    capped_formats: Annotated[str, typer.Option(help="Formats of the capped rows (accelerate runs with bf16 only).")
                              ] = "bf16",
    runtime_mib: Annotated[int, typer.Option(help="R in the cap: what a process needs beside weights and KV.")] = 512,
    offload_margin_mib: Annotated[int, typer.Option(help="M: what offload's capped worker leaves free of the cap "
                                                         "beyond its measured usage, dense weights and KV.")] = 128,
    triad_mib: Annotated[int, typer.Option(help="Triad: MiB per array (three arrays).")] = 256,
    triad_repeats: Annotated[int, typer.Option(help="Triad: timed iterations (best and median kept).")] = 20,
    timeout: Annotated[float, typer.Option(help="Seconds one worker may take.")] = 1800.0,
    out: Annotated[Path, typer.Option(help="JSON to write (after every sample).")] = Path(
        "scripts/results/bench_vs_llamacpp.json"),
    table_out: Annotated[Path | None, typer.Option("--table", help="Markdown table (default: --out with .md).")
                         ] = None,
    summarize: Annotated[Path | None, typer.Option(help="Recompute the summary and table of an existing JSON.")
                         ] = None,
    note: Annotated[list[str] | None, typer.Option(help="A note for the JSON and the table (repeatable).")] = None,
    worker: Annotated[str | None, typer.Option(hidden=True)] = None,  # internal: one task as JSON
) -> None:
    """Time offload against llama.cpp, fully resident and under memory caps, with the machine's bandwidth."""
    if summarize:
        resummarize(summarize, table_out)
        return
    if repeats < 1 or new_tokens < 2:
        raise ConfigError("--repeats must be >= 1 and --new-tokens >= 2")
    if gguf_quant not in ("experts", "all"):
        raise ConfigError(f"--gguf-quant {gguf_quant!r}", "use experts or all")
    allowed = tuple(FORMATS)
    opts = Options(model, work_dir, converter, gguf_quant, hidden, intermediate, layers, experts, top_k, heads,
                   kv_heads, vocab, init_range, seed, tokenizer_vocab, prompt, prompt_len, new_tokens, warmup_tokens,
                   repeats, threads, parse_list(formats, allowed, "formats"), parse_caps(caps),
                   parse_list(capped_formats, allowed, "capped formats"), runtime_mib, offload_margin_mib, triad_mib,
                   triad_repeats, timeout, out, table_out, summarize, note or [], worker)
    if worker:
        worker_main(opts)
    else:
        drive(opts)


if __name__ == "__main__":
    main(app)
