"""Decode speed of offload's expert cache against transformers (eager, all in RAM) and accelerate disk offload.

Issue 3's benchmark. Builds (or takes ``--model``) a random Mixtral-shaped checkpoint, then times greedy
decoding for every configuration in its own subprocess (this script re-invoked with ``--worker NAME``,
which prints one JSON line on stdout). Configurations alternate between repeats; the table shows medians
with min-max ranges, and the JSON keeps every raw sample plus the machine and all parameters.

Disk configurations must measure the disk, not the page cache: before the timed run the relevant files'
pages are dropped, and while timing a thread calls posix_fadvise(DONTNEED) on them every ``--drop-ms``.
Pages a process keeps memory-mapped are not dropped; mincore() samples of the files' residency are kept
in the JSON so a reader can see what the page cache still held.

    python scripts/bench_decode.py                                   # full default scale (~1.4 GB experts)
    python scripts/bench_decode.py --hidden 256 --intermediate 512 --layers 4 --repeats 1   # quick check

``--device cuda`` (or ``auto``) runs offload and transformers eager on the GPU (the model moved with
``.to(device)``, CUDA synchronised before every timestamp); accelerate's disk-offload baseline is a
host-memory experiment and runs on the CPU only, so it is skipped there with a message.

With ``--predictor NAME`` every offload configuration also runs as ``CONFIG+NAME`` (prefetching with
that predictor), and the summary adds paired ratios against the same configuration without it:
decode tok/s, stall-causing accesses per token, stall time, plus prefetch precision and the
predictor's share of decode time (issue 6):

    python scripts/bench_decode.py --model tiny-moe --dtype auto --prompt "def fibonacci(n):" \\
        --configs offload-ram-50,offload-ram-25,offload-disk-50,offload-disk-25 --predictor pregate
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Annotated

import typer
from common import machine_info, main, make_app, write_json
from timing import BusyMeter, TokenClock, max_rss_bytes

from offload.errors import CheckpointError, ConfigError
from offload.files import atomic_output

BUDGETS = ("100%", "50%", "25%")
OURS = [f"offload-{tier}-{b[:-1]}" for tier in ("ram", "disk") for b in BUDGETS]
# offload-TIER-PCT[bf][@SCHEME][+PREDICTOR]: PCT of the experts of the run's format, or with "bf" the bytes of
# PCT of the bf16 experts; @SCHEME runs the checkpoint quantized by `offload quantize` (int8, int4-g128-asym, ...)
OURS_RE = re.compile(r"offload-(?P<tier>ram|disk)-(?P<pct>\d+)(?P<bf>bf)?(?:@(?P<quant>[\w-]+))?")
HF_EAGER = "hf-eager"
HF_ACCEL = "hf-accelerate-disk"
CONFIGS = OURS + [HF_EAGER, HF_ACCEL]
ACCEL_BUDGET = "25%"  # accelerate gets the same host memory as our 25% budget
DECODE_COUNTS = ("hits", "misses", "evictions", "bytes_loaded", "load_time_s", "compute_time_s", "stalls",
                 "stall_time_s", "prefetch_issued", "prefetch_used", "prefetch_wasted")
INTERNAL = ("worker", "worker_model", "build")  # the worker protocol's options: not parameters of the run

app = make_app(__doc__.splitlines()[0], no_args_is_help=False)  # bare: the benchmark at its default scale


# -- options -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Options:
    """Every option of a run, in the order the JSON's ``params`` lists them; ``configs`` is expanded
    (``CONFIG+PREDICTOR`` runs added, accelerate dropped on CUDA)."""

    model: str | None
    dtype: str
    device: str
    prompt: str | None
    predictor: str
    lookahead: int
    policy: str
    work_dir: Path
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
    prompt_len: int
    new_tokens: int
    warmup_tokens: int
    repeats: int
    threads: int
    drop_ms: float
    configs: list[str]
    quant: str
    calibration: Path | None
    hybrid: str
    timeout: float
    out: Path
    summarize: Path | None
    note: list[str]
    worker: str | None = None
    worker_model: Path | None = None
    build: bool = False

    def params(self) -> dict:
        """The run's parameters for the JSON: every option but the worker protocol's, paths as strings."""
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items() if k not in INTERNAL}


def is_ours(name: str) -> bool:
    return OURS_RE.fullmatch(base_config(name)) is not None


def quant_of(name: str) -> str | None:
    """'offload-disk-25bf@int4+pregate' -> 'int4' (None: the checkpoint as it is)."""
    m = OURS_RE.fullmatch(base_config(name))
    return m["quant"] if m else None


def parse_configs(text: str, predictor: str, device: str, quant: str = "") -> tuple[list[str], list[str]]:
    """(configurations to run, configurations skipped on this device) from ``--configs`` and ``--quant``."""
    configs = [c.strip() for c in text.split(",") if c.strip()]
    unknown = [c for c in configs if c not in (HF_EAGER, HF_ACCEL) and not is_ours(c)]
    if unknown:
        raise ConfigError(f"unknown configurations {sorted(unknown)}",
                          f"choose from {','.join(CONFIGS)}, optionally with @SCHEME (offload-ram-100@int4)")
    for scheme in [q.strip() for q in quant.split(",") if q.strip()]:
        configs += [f"{c}@{scheme}" for c in configs if c in OURS]
    skipped = [c for c in configs if c == HF_ACCEL and device != "cpu"]
    configs = [c for c in configs if c not in skipped]
    if not configs:
        raise ConfigError(f"nothing to run on {device}", f"{HF_ACCEL} runs with --device cpu only")
    from offload.experts.quant import parse_scheme

    for scheme in {quant_of(c) for c in configs} - {None}:
        parse_scheme(scheme)  # an unknown scheme fails before any run
    if predictor != "none":
        configs += [f"{c}+{predictor}" for c in configs if is_ours(c) and "+" not in c]
    return configs, skipped


def resolved_device(name: str) -> str:
    """``cpu`` or ``cuda`` for ``--device`` (auto: cuda when there is one); a DeviceError when cuda is absent."""
    if name not in ("cpu", "cuda", "auto"):
        raise ConfigError(f"unknown device {name!r}", "use one of: cpu, cuda, auto")
    from offload.runtime.load import resolve_device

    return resolve_device(name).type


def base_config(name: str) -> str:
    """'offload-ram-50+pregate' -> 'offload-ram-50'."""
    return name.split("+", 1)[0]


def model_dir(opts: Options) -> Path:
    if opts.model:
        from offload.checkpoint.locate import resolve_model_dir

        return resolve_model_dir(opts.model)
    name = (f"mixtral-h{opts.hidden}-i{opts.intermediate}-l{opts.layers}-e{opts.experts}-k{opts.top_k}"
            f"-a{opts.heads}x{opts.kv_heads}-v{opts.vocab}-r{opts.init_range}-s{opts.seed}")
    return opts.work_dir / name


# -- model ---------------------------------------------------------------------------------------
def build_model(opts: Options, out: Path) -> None:
    """Random Mixtral in bf16, saved with save_pretrained (per-expert tensors, as the hub has them)."""
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(opts.seed)
    torch.set_num_threads(opts.threads)
    config = MixtralConfig(
        vocab_size=opts.vocab, hidden_size=opts.hidden, intermediate_size=opts.intermediate,
        num_hidden_layers=opts.layers, num_attention_heads=opts.heads, num_key_value_heads=opts.kv_heads,
        num_local_experts=opts.experts, num_experts_per_tok=opts.top_k, initializer_range=opts.init_range,
        max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    model = MixtralForCausalLM._from_config(config, dtype=torch.bfloat16)
    with atomic_output(out, directory=True) as tmp:  # a half-written model is never mistaken for a cached one
        model.save_pretrained(tmp)


def ensure_model(opts: Options) -> Path:
    path = model_dir(opts)
    if (path / "config.json").is_file():
        return path
    if opts.model:
        raise CheckpointError(f"{path} holds no config.json", "give a Mixtral-shaped checkpoint folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    log(f"building {path.name} (cached for later runs) ...")
    t0 = time.time()
    proc = subprocess.run([sys.executable, __file__, "--build", *sys.argv[1:]], env=worker_env(opts), check=False)
    if proc.returncode != 0:
        raise CheckpointError(f"building {path} failed (exit {proc.returncode})", "see the messages above")
    log(f"built in {time.time() - t0:.0f}s")
    return path


# -- page cache ----------------------------------------------------------------------------------
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


def cached_bytes(paths: list[Path]) -> int:
    """Bytes of ``paths`` in the page cache now (mincore on a fresh, untouched mapping)."""
    total = 0
    page = mmap.PAGESIZE
    for path in paths:
        size = path.stat().st_size
        if size == 0:
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                continue
            try:
                vec = (ctypes.c_ubyte * (-(-size // page)))()
                if _libc.mincore(addr, size, vec) == 0:
                    total += (len(vec) - bytes(vec).count(0)) * page  # nonzero = resident
            finally:
                _libc.munmap(addr, size)
        finally:
            os.close(fd)
    return total


class PageDropper:
    """Calls posix_fadvise(DONTNEED) on whole files every ``period`` s while timing, and samples residency."""

    def __init__(self, groups: dict[str, list[Path]], period: float) -> None:
        self.groups = {g: ps for g, ps in groups.items() if ps}
        self.paths = [p for ps in self.groups.values() for p in ps]
        self.period = period
        self.drops = 0
        self.resident_samples: list[dict[str, int]] = []  # bytes cached per group just before a drop (every 10th)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def drop_now(self) -> None:
        os.sync()  # dirty pages (accelerate's freshly written offload files) cannot be dropped
        for path in self.paths:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)

    def _run(self) -> None:
        fds = [os.open(p, os.O_RDONLY) for p in self.paths]
        try:
            while not self._stop.wait(self.period):
                if self.drops % 10 == 0:
                    self.resident_samples.append({g: cached_bytes(ps) for g, ps in self.groups.items()})
                for fd in fds:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                self.drops += 1
        finally:
            for fd in fds:
                os.close(fd)

    def __enter__(self) -> PageDropper:  # noqa: PYI034 - typing.Self needs Python 3.11; 3.10 is supported
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict:
        out = {"period_s": self.period, "drops": self.drops, "resident_samples": len(self.resident_samples)}
        for g, ps in self.groups.items():
            s = [r[g] for r in self.resident_samples]
            out[g] = {"files": [str(p) for p in ps], "file_bytes": sum(p.stat().st_size for p in ps),
                      "resident_bytes_mean": int(statistics.fmean(s)) if s else None,
                      "resident_bytes_max": max(s) if s else None}
        return out


class NullDropper:
    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


# -- timing helpers (the clock and the busy meter are in timing.py) ---------------------------------
def synchronizer(device: str) -> Callable[[], None]:
    """What waits for ``device`` before a timestamp: torch.cuda.synchronize on CUDA (kernels run
    asynchronously, so a clock read after a launch would time the launch), nothing on the CPU."""
    if device == "cpu":
        return lambda: None
    import torch

    return torch.cuda.synchronize


# -- workers -------------------------------------------------------------------------------------
def prompt_ids(opts: Options, path: Path):
    """[1, tokens] ids: ``--prompt`` with the checkpoint's tokenizer.json (the call offload's encode makes,
    so every runtime gets the same ids), else ``--prompt-len`` seeded random ids."""
    import torch

    if opts.prompt:
        from tokenizers import Tokenizer

        if not (path / "tokenizer.json").is_file():
            raise CheckpointError(f"{path} has no tokenizer.json", "drop --prompt to time random token ids")
        return torch.tensor([Tokenizer.from_file(str(path / "tokenizer.json")).encode(opts.prompt).ids])
    g = torch.Generator().manual_seed(opts.seed + 1)
    return torch.randint(3, opts.vocab, (1, opts.prompt_len), generator=g)


def expert_bytes_of(path: Path) -> tuple[int, int]:
    import offload

    plan = offload.plan_checkpoint(path)
    return plan.dense_nbytes, plan.spec.total_experts * plan.expert_nbytes()


def run_ours(opts: Options, name: str, path: Path) -> dict:
    import offload
    from offload.memory.transfer import DirectReader

    spec = OURS_RE.fullmatch(base_config(name))
    tier, budget = spec["tier"], f"{spec['pct']}%"
    if spec["quant"]:
        path = quantized_dir(opts, path, spec["quant"])
    if spec["bf"]:  # the bytes of PCT% of the experts in bf16: the same memory as the bf16 run at PCT%
        s = offload.plan_checkpoint(path).spec
        budget = f"{s.total_experts * s.expert_params * 2 * int(spec['pct']) // 100}B"
    predictor = name.split("+", 1)[1] if "+" in name else "none"
    sync = synchronizer(opts.device)
    t0 = time.perf_counter()
    m = offload.from_pretrained(path, device=opts.device, dtype=opts.dtype, expert_budget=budget,
                                offload_to=tier, policy=opts.policy, predictor=predictor, lookahead=opts.lookahead,
                                hybrid=opts.hybrid)
    sync()
    load_s = time.perf_counter() - t0
    ids = prompt_ids(opts, path)
    m.generate(ids, max_new_tokens=opts.warmup_tokens, do_sample=False, eos_token_id=[])  # kernels, allocator
    m.cache.clear()
    m.stats.reset()
    files = list(m.cache.store.files) if tier == "disk" else []
    if files:
        DirectReader().drop_cache(files)
    dropper = PageDropper({"checkpoint": files}, opts.drop_ms / 1000) if files else NullDropper()
    reader = m.cache.store.reader if files else None

    def requests() -> int:  # read requests the disk tier has issued so far
        return reader.requests if reader is not None else 0

    after_prefill = {}
    clock = TokenClock(on_first=lambda: after_prefill.update(m.stats.total.to_dict(), read_requests=requests()),
                       sync=sync)
    with BusyMeter() as busy, dropper:
        out = m.generate(ids, max_new_tokens=opts.new_tokens, do_sample=False, eos_token_id=[], streamer=clock)
        sync()
    stats = m.stats.to_dict()
    total = stats["total"]
    decode_only = {k: total[k] - after_prefill[k] for k in DECODE_COUNTS}
    decode_only["read_requests"] = requests() - after_prefill["read_requests"]
    sample = {**clock.result(), "load_model_s": load_s, "num_slots": m.cache.num_slots,
              "expert_format": m.plan.expert_format.name, "slot_nbytes": m.cache.slot_nbytes,
              "total_experts": m.spec.total_experts, "stats": {k: v for k, v in stats.items() if k != "layers"},
              "decode_cache": decode_only, "busy": busy.result, "new_token_ids": out[0, ids.shape[1]:].tolist()}
    if files:
        sample["page_cache"] = dropper.summary()
    return sample


def quantized_dir(opts: Options, path: Path, scheme: str) -> Path:
    """The bench model quantized with ``scheme`` by `offload quantize` (cached beside the built models)."""
    return opts.work_dir / f"{path.name}@{scheme}"


def ensure_quantized(opts: Options, path: Path) -> None:
    from offload.experts.quant import parse_scheme
    from offload.tools.quantize import quantize_checkpoint

    for scheme in sorted({quant_of(c) for c in opts.configs} - {None}):
        out = quantized_dir(opts, path, scheme)
        if not (out / "config.json").is_file():
            log(f"quantizing {path.name} as {scheme} (cached) ...")
            quantize_checkpoint(path, out, parse_scheme(scheme))


def accelerate_setup(opts: Options, path: Path) -> tuple[dict, dict, Path]:
    """from_pretrained's extra arguments for accelerate's disk offload (host memory = dense bytes + our 25%
    budget of expert bytes, the rest in a fresh offload folder), what to record about it, and the folder."""
    dense, experts = expert_bytes_of(path)
    budget = dense + int(experts * float(ACCEL_BUDGET[:-1]) / 100)
    folder = opts.work_dir / f"accelerate-offload-{path.name}"
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.iterdir():  # each run writes its own; stale files would only confuse the dropper
        old.unlink()
    kwargs = {"device_map": "auto", "max_memory": {"cpu": budget}, "offload_folder": str(folder)}
    extra = {"max_memory_cpu_bytes": budget, "dense_bytes": dense, "expert_bytes": experts,
             "offload_folder": str(folder)}
    return kwargs, extra, folder


def accelerate_placement(model, path: Path, folder: Path) -> tuple[dict, dict[str, list[Path]]]:
    """Where accelerate put each module, and the files whose pages the dropper must drop."""
    dmap = getattr(model, "hf_device_map", {})
    extra = {"device_map_counts": {str(d): sum(1 for v in dmap.values() if v == d) for d in set(dmap.values())},
             "layers_on_disk": sorted(k for k, v in dmap.items() if v == "disk")}
    # Offloaded weights may be read from the checkpoint's own safetensors or from the folder: drop both.
    # (the checkpoint's pages that transformers keeps memory-mapped for resident weights stay cached)
    files = {"offload_folder": sorted(p for p in folder.rglob("*") if p.is_file()),
             "checkpoint": sorted(path.glob("*.safetensors"))}
    return extra, files


def run_hf(opts: Options, name: str, path: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    if name == HF_ACCEL and opts.device != "cpu":
        raise ConfigError(f"{HF_ACCEL} runs on the CPU only", "use --device cpu for the accelerate baseline")
    sync = synchronizer(opts.device)
    kwargs: dict = {"dtype": torch.bfloat16}
    files: dict[str, list[Path]] = {}
    extra: dict = {}
    if name == HF_ACCEL:
        accel_kwargs, extra, folder = accelerate_setup(opts, path)
        kwargs |= accel_kwargs
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()
    if name != HF_ACCEL:
        model = model.to(opts.device)
    sync()
    load_s = time.perf_counter() - t0
    if name == HF_ACCEL:
        placement, files = accelerate_placement(model, path, folder)
        extra |= placement
    ids = prompt_ids(opts, path).to(opts.device)
    gen = {"attention_mask": torch.ones_like(ids), "do_sample": False, "pad_token_id": 0}
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=opts.warmup_tokens, min_new_tokens=opts.warmup_tokens, **gen)
        if files:
            PageDropper(files, 0).drop_now()
        dropper = PageDropper(files, opts.drop_ms / 1000) if files else NullDropper()
        clock = TokenClock(sync=sync)
        with BusyMeter() as busy, dropper:
            out = model.generate(ids, max_new_tokens=opts.new_tokens, min_new_tokens=opts.new_tokens, streamer=clock,
                                 **gen)
            sync()
    sample = {**clock.result(), "load_model_s": load_s, "busy": busy.result, **extra,
              "attn_implementation": getattr(model.config, "_attn_implementation", None),
              "experts_implementation": getattr(model.config, "_experts_implementation", None),
              "new_token_ids": out[0, ids.shape[1]:].tolist()}
    if files:
        sample["page_cache"] = dropper.summary()
    return sample


def worker_main(opts: Options) -> None:
    """Time one configuration (``--worker NAME``) and print its sample as one JSON line on stdout."""
    import torch

    torch.set_num_threads(opts.threads)
    load_before = os.getloadavg()
    run = run_ours if opts.worker.startswith("offload-") else run_hf
    sample = run(opts, opts.worker, opts.worker_model)
    sample |= {"config": opts.worker, "device": opts.device, "threads": torch.get_num_threads(),
               "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
               "max_rss_bytes": max_rss_bytes()}
    if opts.device == "cuda":
        sample["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
    print(json.dumps(sample), flush=True)


# -- driver --------------------------------------------------------------------------------------
def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def worker_env(opts: Options) -> dict:
    threads = str(opts.threads)
    return {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "TOKENIZERS_PARALLELISM": "false"}


def run_worker(opts: Options, name: str, path: Path) -> dict:
    cmd = [sys.executable, __file__, *sys.argv[1:], "--worker", name, "--worker-model", str(path)]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=worker_env(opts), timeout=opts.timeout,
                          check=False)
    if proc.returncode != 0:
        log(proc.stderr[-4000:])
        return {"config": name, "error": f"worker exited {proc.returncode}", "stderr_tail": proc.stderr[-2000:]}
    sample = json.loads(proc.stdout.strip().splitlines()[-1])
    sample["worker_wall_s"] = round(time.time() - t0, 2)
    return sample


def busy_snapshot() -> dict:
    """Load average, whether the training job runs, and the busiest other processes."""
    train = subprocess.run(["pgrep", "-f", "train_tiny_moe"], capture_output=True, text=True,
                           check=False).stdout.split()
    top = subprocess.run(["ps", "-eo", "pcpu,etimes,args", "--sort=-pcpu", "--no-headers"], capture_output=True,
                         text=True, check=False)
    lines = [line.strip()[:160] for line in top.stdout.splitlines()[:6]]
    return {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "loadavg": os.getloadavg(), "train_tiny_moe_pids": train,
            "top_processes_pcpu_etimes_args": lines}


def schedule(configs: list[str], repeats: int) -> list[tuple[int, str]]:
    """Every configuration once per repeat; the order rotates so no config always follows the same one."""
    order = []
    for r in range(repeats):
        shift = r % len(configs)
        rotated = configs[shift:] + configs[:shift]
        order += [(r, c) for c in (rotated if r % 2 == 0 else rotated[::-1])]
    return order


class Predicted:
    """offload/hw/perfmodel.py's decode tok/s beside an offload sample: the time per token of the sample's tier,
    format and device with the misses per decode token the sample measured (so it tests the time model; the hit
    rates, which the simulator reproduces exactly, are not what is being checked), from the calibration loaded
    once at the start of the run. Prefetches are not modelled: a +PREDICTOR run is predicted as its misses."""

    def __init__(self, opts: Options, path: Path) -> None:
        from offload.hw.calibration import Calibration, default_path

        self.source = str(opts.calibration or default_path())
        self.calibration = Calibration.load(opts.calibration)
        self.opts, self.path = opts, path
        self._sizes: dict[str, object] = {}

    def sizes(self, config: str):
        from offload.checkpoint.plan import plan_checkpoint
        from offload.spec import parse_dtype
        from offload.tools.plan import model_sizes

        scheme = quant_of(config)
        path = quantized_dir(self.opts, self.path, scheme) if scheme else self.path
        if str(path) not in self._sizes:
            plan = plan_checkpoint(path)
            self._sizes[str(path)] = model_sizes(plan, self.opts.device, parse_dtype(self.opts.dtype))
        return self._sizes[str(path)]

    def __call__(self, sample: dict) -> float | None:
        from offload.hw.perfmodel import token_cost

        if "error" in sample or not is_ours(sample["config"]) or not sample.get("decode_tokens"):
            return None
        sizes, decode = self.sizes(sample["config"]), sample["decode_cache"]
        misses = min(decode["misses"] / sample["decode_tokens"], sizes.active)
        reuse = decode["hits"] / (decode["hits"] + decode["misses"]) if decode["hits"] + decode["misses"] else 0.0
        tier = OURS_RE.fullmatch(base_config(sample["config"]))["tier"]
        return token_cost(sizes, self.calibration, self.opts.device, tier, misses, self.opts.hybrid,
                          reuse).tokens_per_s

    def to_json(self) -> dict:
        return {"source": self.source, **self.calibration.to_json()}  # ``measured`` empty: the defaults


def drive(opts: Options) -> None:
    """Time every configuration ``--repeats`` times, each in a fresh worker; write the JSON after each sample."""
    t_start = time.time()
    path = ensure_model(opts)
    ensure_quantized(opts, path)
    predicted = Predicted(opts, path)
    before = busy_snapshot()
    log(f"model {path}; configs {opts.configs} on {opts.device}; {opts.repeats} repeats; "
        f"load average {before['loadavg']}")
    samples = []
    plan = schedule(opts.configs, opts.repeats)
    for rep, name in plan:
        s = run_worker(opts, name, path)
        s["repeat"] = rep
        if (tps := predicted(s)) is not None:
            s["predicted_tokens_per_s"] = tps
        samples.append(s)
        msg = s.get("error") or (f"{s['decode_tokens_per_s']:.2f} tok/s "
                                 f"(other procs {s['busy']['other_processes_cores']} cores)")
        log(f"  repeat {rep} {name:22s} {msg}")
        # Written after every sample, so an interrupted run still leaves what it measured.
        result = report(opts, path, samples, before, t_start, complete=len(samples) == len(plan),
                        calibration=predicted.to_json())
    print(table(result["summary"]))
    log(f"wrote {opts.out} in {result['wall_time_s']:.0f}s")


def report(opts: Options, path: Path, samples: list[dict], before: dict, t_start: float, complete: bool,
           calibration: dict | None = None) -> dict:
    """The JSON of the run so far (written to ``--out``, atomically): machine, parameters, the calibration the
    predictions used, samples, summary."""
    summary = summarize(samples, opts.configs, opts.repeats)
    cfg = json.loads((path / "config.json").read_text())
    result = {
        "benchmark": "bench_decode", "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "complete": complete, "wall_time_s": round(time.time() - t_start, 1),
        "machine": machine_info("transformers", "accelerate"), "device": opts.device,
        "busy_before": before, "busy_after": busy_snapshot(), "params": opts.params(), "calibration": calibration,
        "model": {"path": str(path), "config": {k: cfg.get(k) for k in (
            "hidden_size", "intermediate_size", "num_hidden_layers", "num_local_experts", "num_experts_per_tok",
            "num_attention_heads", "num_key_value_heads", "vocab_size", "initializer_range", "dtype", "torch_dtype")},
            "checkpoint_bytes": sum(p.stat().st_size for p in path.glob("*.safetensors"))},
        "method": ("each sample is one fresh worker process: load, untimed warm-up generate, cache cleared and "
                   "stats reset (ours), page cache of the disk files dropped, then one timed greedy generate; "
                   "decode tok/s = (new_tokens - 1) / (time of last new token - time of first new token) from a "
                   "streamer, for every runtime; hits/misses/bytes/load stall count decode steps only"),
        "notes": [f"{HF_ACCEL} gets max_memory cpu = dense bytes + {ACCEL_BUDGET} of expert bytes (our 25% budget)",
                  ("page_cache.resident_bytes_* are mincore() samples taken just before a drop: what the page cache "
                   "held of the disk files; pages a process keeps memory-mapped cannot be dropped"),
                  ("predicted_tokens_per_s (offload samples): offload/hw/perfmodel.py's decode time per token from "
                   "`calibration` and the misses per decode token the sample measured")],
        "samples": samples, "summary": summary,
    }
    write_json(opts.out, result)
    return result


def median_range(values: list[float]) -> dict:
    if not values:
        return {}
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def _cache_row(config: str, ss: list[dict]) -> dict:
    """An offload configuration's decode-only cache counts, and with a predictor its accuracy and cost."""
    row = {f"decode_{k}": median_range([s["decode_cache"].get(k, 0) for s in ss]) for k in DECODE_COUNTS}
    row["total_load_time_s"] = median_range([s["stats"]["total"]["load_time_s"] for s in ss])
    row["decode_misses_per_token"] = median_range([s["decode_cache"]["misses"] / s["decode_tokens"]
                                                   for s in ss if s.get("decode_tokens")])
    row["decode_mib_per_miss"] = median_range([s["decode_cache"]["bytes_loaded"] / s["decode_cache"]["misses"] / 2**20
                                               for s in ss if s["decode_cache"].get("misses")])
    row["decode_reads_per_miss"] = median_range([s["decode_cache"].get("read_requests", 0) / s["decode_cache"]["misses"]
                                                 for s in ss if s["decode_cache"].get("misses")])
    row["decode_stalls_per_token"] = median_range([s["decode_cache"].get("stalls", 0) / s["decode_tokens"]
                                                   for s in ss if s.get("decode_tokens")])
    if "+" in config:
        row["precision_lookahead_1"] = median_range([s["stats"]["prediction"]["1"]["precision"] for s in ss])
        row["recall_lookahead_1"] = median_range([s["stats"]["prediction"]["1"]["recall"] for s in ss])
        row["predictor_share_of_decode"] = median_range(
            [s["stats"]["predictor_time_s"] / s["stats"]["decode_time_s"] for s in ss if s["stats"]["decode_time_s"]])
    predicted = [s for s in ss if s.get("predicted_tokens_per_s")]
    row["predicted_tokens_per_s"] = median_range([s["predicted_tokens_per_s"] for s in predicted])
    row["predicted_over_measured"] = median_range([s["predicted_tokens_per_s"] / s["decode_tokens_per_s"]
                                                   for s in predicted if s["decode_tokens_per_s"]])
    return row


def _config_row(config: str, ss: list[dict], failed: int, reference: list[int] | None) -> dict:
    """One configuration's medians [min-max] over its successful samples ``ss``."""
    row = {"decode_tokens_per_s": median_range([s["decode_tokens_per_s"] for s in ss]), "failed": failed}
    if ss and is_ours(config):
        row |= _cache_row(config, ss)
    if ss:
        row["max_rss_bytes"] = median_range([s["max_rss_bytes"] for s in ss])
        row["other_processes_cores"] = median_range([s["busy"]["other_processes_cores"] for s in ss])
        if reference:
            row["tokens_match_hf_eager"] = [sum(1 for _ in _common_prefix(s["new_token_ids"], reference))
                                            for s in ss]
    return row


def summarize(samples: list[dict], configs: list[str], repeats: int) -> dict:
    """Per configuration medians and ranges, and the ratios paired per repeat (ours / theirs, with / without
    a predictor)."""
    ok = [s for s in samples if "error" not in s]
    by = {c: [s for s in ok if s["config"] == c] for c in configs}
    summary: dict = {"configs": {}, "ratios": {}}
    reference = next((s["new_token_ids"] for s in by.get(HF_EAGER, [])), None)
    for c, ss in by.items():
        failed = sum(1 for s in samples if s["config"] == c and "error" in s)
        summary["configs"][c] = _config_row(c, ss, failed, reference)
    pairs = [("offload-ram-100", HF_EAGER), ("offload-disk-100", HF_EAGER), ("offload-disk-25", HF_ACCEL)]
    extra = [(c, c.split("@")[0]) for c in configs if "@" in c and "+" not in c]  # a format against bf16
    extra += [(c, HF_ACCEL) for c in configs if c.startswith("offload-disk-25bf") and "+" not in c]
    for ours, theirs in [(a, b) for a, b in pairs + extra if a in by and b in by]:  # pairs that both ran
        summary["ratios"][f"{ours} / {theirs}"] = paired_ratio(by[ours], by[theirs], repeats)
    for c in configs:
        if "+" in c:
            plain, pred = by.get(base_config(c), []), by.get(c, [])
            summary["ratios"][f"{c} / {base_config(c)}"] = paired_ratio(pred, plain, repeats)
            for key in ("stalls_per_token", "stall_time_s"):
                summary["ratios"][f"{c} / {base_config(c)}: {key}"] = paired_ratio(pred, plain, repeats, key)
    return summary


def _common_prefix(a: list[int], b: list[int]):
    for x, y in zip(a, b):
        if x != y:
            return
        yield x


def _measure(sample: dict, key: str) -> float:
    if key == "decode_tokens_per_s":
        return sample[key]
    decode = sample["decode_cache"]
    return decode["stalls"] / sample["decode_tokens"] if key == "stalls_per_token" else decode[key]


def paired_ratio(ours: list[dict], theirs: list[dict], repeats: int, key: str = "decode_tokens_per_s") -> dict:
    """Ratio of ``key`` (decode speed by default) within each repeat (the two ran close in time), then median
    and range."""
    a = {s["repeat"]: _measure(s, key) for s in ours}
    b = {s["repeat"]: _measure(s, key) for s in theirs}
    ratios = [a[r] / b[r] for r in range(repeats) if r in a and r in b and b[r]]
    out = median_range(ratios)
    if a and b and statistics.median(b.values()):  # a stall ratio at 100%: no stalls without the predictor
        out["of_medians"] = statistics.median(a.values()) / statistics.median(b.values())
    return out


def fmt_range(d: dict, scale: float = 1.0, digits: int = 2) -> str:
    if not d:
        return "n/a"
    return f"{d['median'] * scale:.{digits}f} [{d['min'] * scale:.{digits}f}–{d['max'] * scale:.{digits}f}]"


def _config_lines(rows: dict) -> list[str]:
    ref = rows.get(HF_EAGER, {}).get("decode_tokens_per_s", {}).get("median")
    lines = [("| configuration | decode tok/s median [min–max] | vs HF eager | decode hits | decode misses "
              "| misses / token | MiB per miss | reads per miss | decode GiB loaded | decode stall s | peak RSS GiB "
              "| other procs' cores | predicted tok/s | predicted / measured |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c, r in rows.items():
        tps = r["decode_tokens_per_s"]
        rel = f"{tps['median'] / ref:.2f}x" if tps and ref else "n/a"
        cache = [fmt_range(r.get(f"decode_{k}", {}), s, d) for k, s, d in
                 (("hits", 1, 0), ("misses", 1, 0), ("misses_per_token", 1, 2), ("mib_per_miss", 1, 1),
                  ("reads_per_miss", 1, 2), ("bytes_loaded", 2**-30, 2), ("stall_time_s", 1, 2))]
        predicted = [fmt_range(r.get("predicted_tokens_per_s", {})), fmt_range(r.get("predicted_over_measured", {}))]
        if not is_ours(c):
            cache, predicted = ["–"] * 7, ["–"] * 2
        lines.append(f"| {c} | {fmt_range(tps)} | {rel} | " + " | ".join(cache) +
                     f" | {fmt_range(r.get('max_rss_bytes', {}), 2**-30)} | "
                     f"{fmt_range(r.get('other_processes_cores', {}))} | " + " | ".join(predicted) + " |")
    return lines


def _prefetch_lines(rows: dict) -> list[str]:
    predicted = [c for c in rows if "+" in c]
    if not predicted:
        return []
    lines = ["", ("| configuration | decode stalls/token | decode stall s | prefetches issued / used / wasted "
                  "| precision@1 | recall@1 | predictor time / decode time |"), "|---|---|---|---|---|---|---|"]
    for c in [base_config(c) for c in predicted if base_config(c) in rows] + predicted:
        r = rows[c]
        pf = " / ".join(fmt_range(r.get(f"decode_prefetch_{k}", {}), 1, 0) for k in ("issued", "used", "wasted"))
        lines.append(f"| {c} | {fmt_range(r.get('decode_stalls_per_token', {}))} | "
                     f"{fmt_range(r.get('decode_stall_time_s', {}), 1, 3)} | {pf} | "
                     f"{fmt_range(r.get('precision_lookahead_1', {}))} | "
                     f"{fmt_range(r.get('recall_lookahead_1', {}))} | "
                     f"{fmt_range(r.get('predictor_share_of_decode', {}), 100, 1)}% |")
    return lines


def _ratio_lines(ratios: dict) -> list[str]:
    lines = ["", "| ratio (paired per repeat) | median [min–max] | of medians | target |", "|---|---|---|---|"]
    targets = {"offload-ram-100 / hf-eager": ">= 1.0x", "offload-disk-100 / hf-eager": ">= 1.0x",
               "offload-disk-25 / hf-accelerate-disk": ">= 10x"}
    targets |= {k: "<= 0.5x (50% budget, pregate)" for k in ratios if k.endswith("stalls_per_token")}
    for k, v in ratios.items():
        of = f"{v['of_medians']:.2f}x" if "of_medians" in v else "n/a"
        paired = f"{fmt_range(v)}x" if v else "n/a"
        lines.append(f"| {k} | {paired} | {of} | {targets.get(k, '')} |")
    return lines


def table(summary: dict) -> str:
    """Markdown: every configuration, then (with a predictor) the prefetch table, then the paired ratios."""
    rows = summary["configs"]
    return "\n".join(_config_lines(rows) + _prefetch_lines(rows) + _ratio_lines(summary["ratios"]))


def resummarize(path: Path, notes: list[str], calibration: Path | None = None) -> None:
    """Recompute the summary of a finished (or interrupted) run, print its table, append notes; with a
    calibration, first recompute every sample's predicted tok/s from it (the measured counts stay)."""
    result = json.loads(path.read_text())
    params = result["params"]
    if calibration is not None:
        repredict(result, calibration)
        notes = [*notes, f"predicted_tokens_per_s recomputed from {calibration} (`calibration` is that file)"]
    result["summary"] = summarize(result["samples"], params["configs"], params["repeats"])
    result["notes"] = result.get("notes", []) + notes
    write_json(path, result)
    print(table(result["summary"]))


def repredict(result: dict, calibration: Path) -> None:
    """Replace the predictions of ``result``'s offload samples by those of ``calibration`` (same model files)."""
    names = {f.name for f in fields(Options)}
    params = {k: v for k, v in result["params"].items() if k in names}
    opts = Options(**{**params, "work_dir": Path(params["work_dir"]), "calibration": calibration,
                      "out": Path(params["out"]), "summarize": None})
    predicted = Predicted(opts, Path(result["model"]["path"]))
    for s in result["samples"]:
        if (tps := predicted(s)) is not None:
            s["predicted_tokens_per_s"] = tps
    result["calibration"] = predicted.to_json()


# -- command -------------------------------------------------------------------------------------
@app.command()
def bench(
    model: Annotated[str | None, typer.Option(help="An existing Mixtral-shaped checkpoint dir or bundled model "
                                                   "name (else one is built).")] = None,
    dtype: Annotated[str, typer.Option(help="offload's compute dtype (auto: the checkpoint's).")] = "bfloat16",
    device: Annotated[str, typer.Option(help="cpu, cuda or auto (cuda when there is one): where offload and "
                                             f"transformers eager run. {HF_ACCEL} (a host-memory baseline) runs "
                                             "on cpu only and is skipped on cuda.")] = "cpu",
    prompt: Annotated[str | None, typer.Option(help="Prompt text (with the model's tokenizer) instead of random "
                                                    "token ids.")] = None,
    predictor: Annotated[str, typer.Option(help="Also run every offload config with this predictor.")] = "none",
    lookahead: Annotated[int, typer.Option(help="With --predictor: MoE layers looked ahead.")] = 1,
    policy: Annotated[str, typer.Option(help="offload's eviction policy in every offload config.")] = "lru",
    work_dir: Annotated[Path, typer.Option(help="Built models + offload folders.")] = Path("/tmp/offload-bench"),
    hidden: Annotated[int, typer.Option(help="Built model: hidden size.")] = 1024,
    intermediate: Annotated[int, typer.Option(help="Built model: expert intermediate size.")] = 3584,
    layers: Annotated[int, typer.Option(help="Built model: decoder layers.")] = 8,
    experts: Annotated[int, typer.Option(help="Built model: experts per layer.")] = 8,
    top_k: Annotated[int, typer.Option(help="Built model: experts per token.")] = 2,
    heads: Annotated[int, typer.Option(help="Built model: attention heads.")] = 16,
    kv_heads: Annotated[int, typer.Option(help="Built model: key/value heads.")] = 4,
    vocab: Annotated[int, typer.Option(help="Built model: vocabulary size.")] = 32000,
    init_range: Annotated[float, typer.Option(help="initializer_range (0.02 gives near-tied logits).")] = 0.1,
    seed: Annotated[int, typer.Option(help="Seed of the built model and the random prompt.")] = 0,
    prompt_len: Annotated[int, typer.Option(help="Random prompt's tokens (without --prompt).")] = 32,
    new_tokens: Annotated[int, typer.Option(help="Greedy tokens; decode = all but the first.")] = 64,
    warmup_tokens: Annotated[int, typer.Option(help="Untimed generate before the timed one.")] = 4,
    repeats: Annotated[int, typer.Option(help="Samples per configuration, in alternating order.")] = 3,
    threads: Annotated[int, typer.Option(help="torch threads in every worker.")] = 2,
    drop_ms: Annotated[float, typer.Option(help="Period of the page-cache dropper while timing.")] = 50.0,
    configs: Annotated[str, typer.Option(help=f"Comma list out of {','.join(CONFIGS)}; an offload config may end "
                                              "in @SCHEME (quantized experts) and its budget in bf (the bytes of "
                                              "that share of the bf16 experts).")] = ",".join(CONFIGS),
    quant: Annotated[str, typer.Option(help="Also run every offload config of --configs on the model quantized "
                                            "with each of these schemes (int8, int4-g128-asym, ...).")] = "",
    calibration: Annotated[Path | None, typer.Option(help="Calibration file for the predicted tok/s beside each "
                                                          "offload sample (default: the one `offload bench-hw` "
                                                          "wrote, else its defaults).")] = None,
    hybrid: Annotated[str, typer.Option(help="offload's --hybrid for every offload config (off, auto, always; "
                                             "takes effect with --device cuda once the runtime wires it).")
                      ] = "off",
    timeout: Annotated[float, typer.Option(help="Seconds one worker may take.")] = 1800.0,
    out: Annotated[Path, typer.Option(help="JSON file to write (after every sample).")] = Path("bench_decode.json"),
    summarize: Annotated[Path | None, typer.Option(help="Re-print the table of an existing JSON (and add --note "
                                                        "lines to it; with --calibration, re-predict).")] = None,
    note: Annotated[list[str] | None, typer.Option(help="With --summarize: a note to append to the JSON.")] = None,
    worker: Annotated[str | None, typer.Option(hidden=True)] = None,  # internal: time one configuration
    worker_model: Annotated[Path | None, typer.Option(hidden=True)] = None,
    build: Annotated[bool, typer.Option("--build", hidden=True)] = False,  # internal: build the model
) -> None:
    """Time greedy decoding of offload's configurations, transformers eager and accelerate disk offload."""
    given = dict(locals())  # first: exactly the options above
    if calibration is not None and not calibration.is_file():
        raise ConfigError(f"--calibration {calibration} does not exist", "run `offload bench-hw --out FILE`")
    if summarize:
        resummarize(summarize, note or [], calibration)
        return
    if repeats < 1:
        raise ConfigError(f"--repeats must be >= 1, got {repeats}")
    from offload.hw.costmodel import check_mode

    check_mode(hybrid)
    on = resolved_device(device)
    to_run, skipped = parse_configs(configs, predictor, on, quant)
    opts = Options(**{**given, "device": on, "configs": to_run, "note": note or []})
    if build:
        build_model(opts, model_dir(opts))
    elif worker:
        worker_main(opts)
    else:
        for c in skipped:
            log(f"skipping {c}: accelerate's disk-offload baseline runs on the CPU only (run it with --device cpu)")
        drive(opts)


if __name__ == "__main__":
    main(app)
