"""bench_vs_llamacpp.py's llama.cpp worker: one task given as JSON on the command line, one JSON line on stdout.

A separate entry point because offload's package imports torch: a llama.cpp worker that imported it would carry
torch's libraries and heap into its memory cgroup and its RSS, which llama.cpp itself never needs. This module
imports only the standard library, numpy, llama_cpp and timing.py (and gguf-py for reading tensor sizes).

    python scripts/llamacpp_worker.py '{"task": "run", "weights": "m.gguf", "ids": [1, 2], ...}'
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
import time
from pathlib import Path

from timing import max_rss_bytes, rss_bytes, timed

# llama_ftype: LLAMA_FTYPE_MOSTLY_Q8_0, _Q4_0, _Q4_K_M (Q4_K, with some layers' ffn_down in Q6_K)
LLAMA_FTYPES = {"q8_0": 7, "q4_0": 2, "q4_k_m": 15}
GGML_TYPE_F16 = 1


def greedy(llm, ids: list[int], n: int, clock=None, margins: list[float] | None = None) -> list[int]:
    """``n`` greedy tokens after ``ids`` from llama.cpp's logits (argmax in numpy: offload's greedy is an argmax,
    and ties go to the lowest id in both); ``margins`` gets each step's gap between the top two logits."""
    import llama_cpp
    import numpy as np

    n_vocab = llm.n_vocab()
    llm.reset()  # the next eval drops the KV cache from position 0
    if clock:
        clock.put(np.asarray(ids))
    llm.eval(ids)
    out: list[int] = []
    for i in range(n):
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
        out.append(int(np.argmax(logits)))
        if margins is not None:
            top2 = np.partition(logits, -2)[-2:]
            margins.append(float(top2[1] - top2[0]))
        if clock:
            clock.put(np.asarray(out[-1:]))
        if i < n - 1:
            llm.eval(out[-1:])
    return out


def without_repack(llama_cpp) -> None:
    """llama.cpp's ``--no-repack`` (``use_extra_bufts = false``), which llama-cpp-python's Llama() does not expose:
    by default its CPU backend copies Q4_0 / Q4_K / IQ4_NL tensors into anonymous memory in an interleaved layout
    for its AVX2 kernels, which a memory cap cannot page out (no swap here: the cgroup's OOM killer ends it). With
    no repack every weight stays a page of the mmapped file, which the kernel can drop and read again."""
    module = llama_cpp.llama_cpp
    default = module.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    module.llama_model_default_params = params


def run(task: dict) -> dict:
    """Load the GGUF (default mmap; without the repack where the task says so), an untimed warm-up, then the timed
    greedy run."""
    import llama_cpp

    if not task.get("repack", True):
        without_repack(llama_cpp)
    rss0 = rss_bytes()
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path=task["weights"], n_ctx=task["n_ctx"], n_threads=task["threads"],
                          n_threads_batch=task["threads"], use_mmap=True, verbose=False)
    load_s = time.perf_counter() - t0
    greedy(llm, task["ids"], task["warmup_tokens"])
    margins: list[float] = []
    sample = timed(lambda clock: greedy(llm, task["ids"], task["new_tokens"], clock, margins), len(task["ids"]))
    return {**sample, "top2_margins": margins, "load_model_s": load_s, "rss_before_load_bytes": rss0,
            "n_ctx": llm.n_ctx(), "n_batch": llm.n_batch, "threads": task["threads"],
            "llama_cpp_version": llama_cpp.__version__, "repack": task.get("repack", True),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(), "rss_after_bytes": rss_bytes()}


def quantize(src: Path, dst: Path, gtype: str, scope: str, threads: int) -> None:
    """llama.cpp's quantizer from the f16 GGUF; ``experts`` keeps every tensor but the ``*_exps`` ones in f16 (as
    offload quantize keeps all but the routed experts), ``all`` is llama.cpp's own mixture for the type.

    Written to ``dst.partial.gguf`` and renamed when complete.
    """
    import llama_cpp

    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = LLAMA_FTYPES[gtype], threads
    overrides = (llama_cpp.llama_model_tensor_override * 2)()  # the list ends at the zeroed (null pattern) entry
    if scope == "experts":
        params.token_embedding_type = params.output_tensor_type = GGML_TYPE_F16
        overrides[0].pattern, overrides[0].type = b"attn_", GGML_TYPE_F16
        params.tt_overrides = ctypes.cast(overrides, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
    tmp = dst.with_name(dst.name + ".partial.gguf")
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"llama_model_quantize {src} -> {gtype} failed ({rc})")
    tmp.replace(dst)


def tokenize(task: dict) -> dict:
    """The text's token ids by the GGUF's own tokenizer, with its BOS where the file asks for one."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=task["weights"], vocab_only=True, verbose=False)
    add_bos = llm.metadata.get("tokenizer.ggml.add_bos_token", "true") == "true"
    return {"ids": llm.tokenize(task["text"].encode(), add_bos=add_bos)}


def window_nll(logits, window: list[int], count: int) -> float:
    """Summed negative log-likelihood (nats, float64) of the last ``count`` tokens of ``window`` under the logits of
    the positions before them (``logits``: [len(window), vocab], position i predicting token i + 1)."""
    import numpy as np

    rows = np.asarray(logits, dtype=np.float64)[-count - 1 : -1]
    top = rows.max(axis=1, keepdims=True)
    log_z = np.log(np.exp(rows - top).sum(axis=1)) + top[:, 0]
    return float((log_z - rows[np.arange(count), np.asarray(window[-count:])]).sum())


def perplexity(task: dict) -> dict:
    """Summed negative log-likelihood of the scored tokens of each window (begin, end, scored) of ``ids``, from
    llama.cpp's logits at every position (each window evaluated from an empty KV cache), in float64."""
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(model_path=task["weights"], n_ctx=task["context"], n_batch=task["context"],
                          n_threads=task["threads"], n_threads_batch=task["threads"], logits_all=True, verbose=False)
    ids, nll, scored = task["ids"], 0.0, 0
    t0 = time.perf_counter()
    for begin, end, count in task["spans"]:
        llm.reset()
        llm.eval(ids[begin:end])
        nll += window_nll(np.asarray(llm.scores[: end - begin]), ids[begin:end], count)
        scored += count
    return {"perplexity": float(np.exp(nll / scored)), "tokens": scored, "nll": nll,
            "seconds": time.perf_counter() - t0, "llama_cpp_version": llama_cpp.__version__}


def tensors(gguf: Path, gguf_py: Path) -> dict:
    """name -> bytes and ggml type of every tensor of a GGUF, read with the converter's own gguf package."""
    sys.path.insert(0, str(gguf_py))
    from gguf import GGUFReader

    return {t.name: {"bytes": int(t.n_bytes), "type": t.tensor_type.name} for t in GGUFReader(str(gguf)).tensors}


def main(argv: list[str]) -> None:
    task = json.loads(argv[1])
    kind = task["task"]
    if kind == "run":
        result = run(task)
    elif kind == "gguf-quantize":
        quantize(Path(task["src"]), Path(task["dst"]), task["gtype"], task["scope"], task["threads"])
        result = {}
    elif kind == "tokenize":
        result = tokenize(task)
    elif kind == "perplexity":
        result = perplexity(task)
    elif kind == "gguf-tensors":
        result = {"tensors": tensors(Path(task["gguf"]), Path(task["gguf_py"]))}
    else:
        raise SystemExit(f"Error: unknown task {kind!r}")
    result["max_rss_bytes"] = max_rss_bytes()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv)
