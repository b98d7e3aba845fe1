"""What task expert patterns (PreMoe) buy on the bundled models: pruning's perplexity, warm start's misses, matching.

Three measurements, each on halves of tiny-moe's two workloads that the patterns never saw:

* pruning (PreMoe's table on our models): patterns profiled on one half of each text (code: the standard-library
  modules tiny-moe's training held out, every other one; prose: the stdlib's .txt/.rst documents the prose
  prompts come from, every other paragraph), perplexity on the other half with 100%, 50%, 25% and 12.5% of
  each layer's experts kept: with the task's own pattern, the other task's and the generic one, and the
  expert bytes each keeps;
* warm start, on the runtime with the disk tier at 25%: the held-apart prompts (the second 20 of each prompts
  file, patterns from the first 20), code and prose alternating through one model so each request starts on
  the other task's cache: misses over each request's first 16 decode tokens and over the whole request,
  without patterns, with the matched one, with the generic one; the matching accuracy (and the cosine of
  frequency vectors beside it);
* warm start simulated on routing traces (offload/sim/warmstart.py): the two tiny models' traces, and the
  Mixtral-8x7B HumanEval trace (two problems: each warmed by the other's pattern).

Misses are exact counts; a stall's seconds on a shared 2-core machine are not, so the simulated stall time is the
misses times one expert's read at the disk's O_DIRECT rate (docs/patterns.md says which).

    python scripts/eval_patterns.py --out scripts/results/eval_patterns.json
"""

from __future__ import annotations

import json
import re
import sysconfig
import tempfile
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import typer
from common import ROOT, err, machine_info, main, make_app, write_json, write_text
from make_trace_prompts import PROSE_FILES
from train_tiny_moe import collect_sources, is_held_out

import offload
from offload.memory.patterns import GENERIC, Patterns, TaskPattern, load_patterns, pooled
from offload.runtime.load import identity
from offload.sim.simulate import AccessStream, simulate_prefetch
from offload.sim.warmstart import request_misses, warm_starts
from offload.tools.perplexity import perplexity
from offload.tools.profile import model_routes, profile, trace_identity
from offload.traces.format import Trace, read_trace

app = make_app(__doc__.splitlines()[0], no_args_is_help=False)
TASKS = ("code", "prose")
WORKLOADS = {"code": "stdlib-heldout", "prose": "stdlib-prose"}
TRACES = ROOT / "scripts" / "results" / "traces"
HUMANEVAL = ROOT / "tests" / "data" / "mixtral-8x7b-humaneval.jsonl.gz"
KEEP = (1.0, 0.875, 0.75, 0.5, 0.25, 0.125)
DISK_BYTES_PER_S = 1.2e9  # O_DIRECT sequential reads on these machines (/work/shared/NOTES.md)
MIXTRAL_EXPERT_BYTES = 3 * 4096 * 14336 * 2  # one Mixtral-8x7B expert in bf16
TARGETS = {"warm_first16_cut": 0.40, "prune50_ppl_increase": 0.05}  # issue 26


# ---------------------------------------------------------------------------------------------- the texts


def texts(profile_chars: int = 0) -> dict[str, tuple[list[str], list[str]]]:
    """task -> (profile half, evaluation half); ``profile_chars`` > 0 cuts the profile half to that many characters."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    sources, _ = collect_sources(stdlib, 300_000)
    code = [s.text for s in sources if is_held_out(s.module, 5, 0)]
    paragraphs = []
    for name in PROSE_FILES:
        if (stdlib / name).is_file():
            paragraphs += [" ".join(p.split()) for p in re.split(r"\n\s*\n", (stdlib / name).read_text(
                encoding="utf-8", errors="replace")) if len(p.split()) >= 8]
    halves = {"code": (code[0::2], code[1::2]), "prose": (paragraphs[0::2], paragraphs[1::2])}
    if profile_chars:
        halves = {t: (["\n".join(a)[:profile_chars]], b) for t, (a, b) in halves.items()}
    return halves


def prompts(task: str) -> list[str]:
    return [json.loads(line)["prompt"] for line in (TRACES / f"{WORKLOADS[task]}.prompts.jsonl").open()]


def encode_all(model, parts: list[str], max_tokens: int) -> list[int]:
    ids: list[int] = []
    for text in parts:
        ids += model.encode(text)[0].tolist()
    return ids[:max_tokens] if max_tokens else ids


# -------------------------------------------------------------------------------------------- pruning


def pruning(name: str, halves: dict, folder: Path, max_tokens: int, context: int) -> dict[str, Any]:
    """Perplexity of each evaluation half under every (kept share, pattern), and the bytes each keeps."""
    base = offload.from_pretrained(name)
    spec = base.spec
    sources = {}
    for task in TASKS:
        sources[task] = [folder / f"{name}-{task}.txt"]
        sources[task][0].write_text("\n".join(halves[task][0]))
    patterns = profile(base, sources, {}, context=context)
    path = folder / f"{name}-patterns.json"
    patterns.save(path)
    expert_bytes = base.plan.expert_nbytes()
    rows = []
    for task in TASKS:
        ids = encode_all(base, halves[task][1], max_tokens)
        full = perplexity(base, ids, context, context).perplexity
        for share in KEEP:
            keep = int(np.ceil(share * spec.num_experts - 1e-9))
            row = {"model": name, "text": task, "share": share, "keep": keep, "tokens": len(ids), "full": full,
                   "expert_bytes": keep * spec.num_moe_layers * expert_bytes, "dense_bytes": base.plan.dense_nbytes}
            for which, pattern in (("own", task), ("other", next(t for t in TASKS if t != task)), (GENERIC, GENERIC)):
                if keep < spec.top_k:
                    row[which] = None  # fewer experts than a token routes to: not runnable without changing k
                    continue
                m = offload.from_pretrained(name, patterns=path, prune=str(keep), task=pattern)
                row[which] = perplexity(m, ids, context, context).perplexity
                row[f"{which}_dropped"] = float(np.mean([s.pruned_share for s in m.stats.layers.values()]))
            rows.append(row)
            err.print(f"{name} {task} keep {keep}: " + ", ".join(
                f"{w} {row[w]:.2f}" for w in ("own", "other", GENERIC) if row[w] is not None))
    return {"patterns": patterns, "rows": rows}


def threshold_sweep(name: str, halves: dict, folder: Path, max_tokens: int, context: int,
                    thresholds: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.5)) -> list[dict]:
    """Own-pattern perplexity at 50% and 25% kept for TCESS thresholds r: the choice of the default."""
    base = offload.from_pretrained(name)
    routes = {task: model_routes(base, halves[task][0], context) for task in TASKS}
    out = []
    for r in thresholds:
        found = {t: TaskPattern.measure(t, *routes[t], base.spec.num_experts, r) for t in TASKS}
        patterns = Patterns(identity(base.plan), {**found, GENERIC: pooled(found.values())}, r)
        path = folder / f"{name}-r{r}.json"
        patterns.save(path)
        for task in TASKS:
            ids = encode_all(base, halves[task][1], max_tokens)
            for share in (0.5, 0.25):
                keep = int(np.ceil(share * base.spec.num_experts))
                m = offload.from_pretrained(name, patterns=path, prune=str(keep), task=task)
                out.append({"model": name, "threshold": r, "text": task, "share": share,
                            "perplexity": perplexity(m, ids, context, context).perplexity})
    return out


# ----------------------------------------------------------------------------------------- warm start


class MissSnapshots:
    """A streamer that records the cache's misses after each forward (put 1: the prompt, put 2: after prefill)."""

    def __init__(self, model) -> None:
        self.model, self.misses = model, []

    def put(self, value) -> None:
        self.misses.append(self.model.stats.total.misses)

    def end(self) -> None:
        pass


def warm_start(name: str, folder: Path, new_tokens: int, budget: str, count: int = 20) -> dict[str, Any]:
    """Misses per request on the disk tier at ``budget``: ``count`` held-apart prompts of each task, code and
    prose alternating through one model."""
    path = folder / f"{name}-prompt-patterns.json"
    half = {}
    for task in TASKS:
        half[task] = folder / f"{name}-{task}-prompts.jsonl"
        half[task].write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts(task)[:20]))
    profile(offload.from_pretrained(name), {t: [half[t]] for t in TASKS}, {}).save(path)
    held_apart = zip(*(prompts(t)[20:20 + count] for t in TASKS))
    order = [(task, text) for pair in held_apart for task, text in zip(TASKS, pair)]
    runs = {}
    for label, options in (("none", {}), ("matched", {"patterns": path}), (GENERIC, {"patterns": path,
                                                                                    "task": GENERIC})):
        m = offload.from_pretrained(name, expert_budget=budget, offload_to="disk", **options)
        requests = []
        for task, text in order:
            snap, matched = MissSnapshots(m), sum(m.stats.task.matches.values())
            m.generate(m.encode(text), max_new_tokens=new_tokens, streamer=snap)
            s = snap.misses  # s[1]: after prefill; s[1 + i]: after decode step i
            decoded = sum(m.stats.task.matches.values()) > matched  # no match when the first token ended it
            requests.append({"task": task, "matched": m.stats.task.last if decoded else None,
                             "confidence": m.stats.task.confidence, "prefill": s[1] - s[0],
                             "first16": s[min(17, len(s) - 1)] - s[1], "decode": s[-1] - s[1], "all": s[-1] - s[0]})
        t = m.stats.total
        runs[label] = {"requests": requests, "warm_loads": t.warm_loads, "warm_hits": t.warm_hits,
                       "misses": t.misses, "slots": m.cache.num_slots, "expert_bytes": m.plan.expert_nbytes()}
        err.print(f"{name} warm start {label}: first-16 misses {sum(r['first16'] for r in requests)}, "
                  f"decode {sum(r['decode'] for r in requests)}, warm loads {t.warm_loads}")
    return runs


def matching_accuracy(name: str, patterns_path: Path, count: int = 20) -> dict[str, float]:
    """TAER's accuracy on the held-apart prompts' prefill routing: the runtime's log-likelihood match (a generic
    fallback counts as wrong) and, beside it, the cosine of per-layer frequency vectors (the issue's suggestion)."""
    m, patterns = offload.from_pretrained(name), load_patterns(patterns_path)
    right = {"loglik": 0, "cosine": 0, "generic_fallbacks": 0}
    for task in TASKS:
        for text in prompts(task)[20:20 + count]:
            experts, _ = model_routes(m, [text])
            match = patterns.match(experts)
            right["loglik"] += match.task == task
            right["generic_fallbacks"] += match.task == GENERIC
            q = np.zeros_like(patterns.tasks[task].frequency)
            np.add.at(q, (np.arange(q.shape[0])[None, :, None], experts), 1.0)
            cos = {t: float(np.mean([(a @ b) / np.linalg.norm(a) / np.linalg.norm(b)
                                     for a, b in zip(q, patterns.tasks[t].frequency)])) for t in TASKS}
            right["cosine"] += max(cos, key=cos.get) == task
    return {k: v / (2 * count) if k != "generic_fallbacks" else v for k, v in right.items()}


# -------------------------------------------------------------------------------------------- simulated


def simulated(trace: Trace, patterns: Patterns, capacity: int, task: str | None, seqs: list[int]) -> dict:
    """Simulated misses per request of ``seqs`` with and without the warm start (global LRU, runtime steps)."""
    stream = AccessStream.from_trace(trace)
    warm, matches = warm_starts(trace, patterns, capacity, task=task)
    out = {}
    for label, plan in (("none", {}), ("matched", warm)):
        r = simulate_prefetch(stream, "lru", "global", capacity, pin_steps=True, warm=plan)
        per = [x for x in request_misses(r, trace) if x.seq in seqs]
        out[label] = {"first16": sum(x.first_misses for x in per), "decode": sum(x.decode_misses for x in per),
                      "all": sum(x.misses for x in per), "warm_loads": r.warm_loads, "warm_hits": r.warm_hits}
    out["matches"] = {str(s): m.task for s, m in matches.items() if s in seqs}
    return out


def simulations(tiny: dict[str, Patterns]) -> dict[str, Any]:
    out = {}
    for name, patterns in tiny.items():
        both = {t: read_trace(TRACES / f"{name}-{WORKLOADS[t]}.jsonl.gz") for t in TASKS}
        # one trace of both workloads' held-apart sequences, alternating, as the runtime measurement runs them
        trace = _interleave([both[t] for t in TASKS], range(20, 40))
        capacity = patterns.model.num_layers * patterns.model.num_experts // 4
        out[name] = {**simulated(trace, patterns, capacity, None, sorted(set(trace.seq.tolist()))),
                     "expert_bytes": offload.plan_checkpoint(name).expert_nbytes()}
    he = read_trace(HUMANEVAL)
    for held in (0, 1):
        fit = he.seq == 1 - held
        task = TaskPattern.measure("humaneval", he.experts[fit], he.weights[fit], he.header.num_experts)
        ident, _ = trace_identity(HUMANEVAL)
        patterns = Patterns(ident, {"humaneval": task, GENERIC: task})
        out[f"mixtral-humaneval-{held}"] = {**simulated(he, patterns, 64, "humaneval", [held]),
                                            "expert_bytes": MIXTRAL_EXPERT_BYTES}
    return out


def _interleave(traces: list[Trace], seqs: range) -> Trace:
    """Sequences ``seqs`` of each trace, alternating between the traces, renumbered 0, 1, 2, ..."""
    parts = [(tr, s) for s in seqs for tr in traces]
    index = [np.flatnonzero(tr.seq == s) for tr, s in parts]
    pick = lambda field: np.concatenate([getattr(tr, field)[i] for (tr, _), i in zip(parts, index)])  # noqa: E731
    seq = np.concatenate([np.full(len(i), n, dtype=np.int32) for n, i in enumerate(index)])
    return Trace(traces[0].header, seq, pick("pos"), pick("phase"), pick("experts"), pick("weights"), pick("imputed"))


# ------------------------------------------------------------------------------------------------ report


def tables(result: dict) -> str:
    lines = ["| model | text | experts kept per layer | own pattern | other task's | generic | vs 100% (own) "
             "| expert MiB kept |", "|---|---|---|---|---|---|---|---|"]
    fmt = lambda v: "n/a (< top-k)" if v is None else f"{v:.2f}"  # noqa: E731
    for r in result["pruning"]:
        own = "" if r["own"] is None else f"{100 * (r['own'] / r['full'] - 1):+.1f}%"
        lines.append(f"| {r['model']} | {r['text']} | {r['keep']} ({r['share']:.1%}) | {fmt(r['own'])} "
                     f"| {fmt(r['other'])} | {fmt(r[GENERIC])} | {own} | {r['expert_bytes'] / 2**20:.1f} |")
    lines += ["", "| model | pattern | misses, first 16 decode tokens | cut | misses, whole decode | warm loads "
                  "| warm hits | matching accuracy |", "|---|---|---|---|---|---|---|---|"]
    for name, w in result["warm_start"].items():
        base = sum(r["first16"] for r in w["runs"]["none"]["requests"])
        for label, run in w["runs"].items():
            first = sum(r["first16"] for r in run["requests"])
            lines.append(f"| {name} | {label} | {first} | {1 - first / base:.0%} | "
                         f"{sum(r['decode'] for r in run['requests'])} | {run['warm_loads']} | {run['warm_hits']} | "
                         + (f"{w['accuracy']:.0%} (cosine {w['cosine_accuracy']:.0%})" if label == "matched" else "")
                         + " |")
    lines += ["", "| trace (simulated, 25%, LRU) | misses first 16: none / matched | stall s, first 16 "
                  "| whole decode: none / matched | warm loads (s) | warm hits |", "|---|---|---|---|---|---|"]
    for name, s in result["simulated"].items():
        n, w, read = s["none"], s["matched"], s["expert_bytes"] / DISK_BYTES_PER_S
        lines.append(f"| {name} | {n['first16']} / {w['first16']} ({1 - w['first16'] / max(n['first16'], 1):.0%} "
                     f"cut) | {n['first16'] * read:.2f} / {w['first16'] * read:.2f} | {n['decode']} / {w['decode']} "
                     f"| {w['warm_loads']} ({w['warm_loads'] * read:.2f}) | {w['warm_hits']} |")
    return "\n".join(lines)


@app.command()
def run(
    models: Annotated[str, typer.Option(help="Comma list of bundled models.")] = "tiny-moe,tiny-moe-64",
    max_tokens: Annotated[int, typer.Option(help="Evaluation tokens per text (0: all).")] = 20000,
    context: Annotated[int, typer.Option(help="Tokens per perplexity window (and per profiling forward).")] = 512,
    new_tokens: Annotated[int, typer.Option(help="Greedy tokens per warm-start request.")] = 64,
    budget: Annotated[str, typer.Option(help="Expert budget of the warm-start runs.")] = "25%",
    sweep: Annotated[bool, typer.Option(help="Also sweep the TCESS threshold r.")] = True,
    count: Annotated[int, typer.Option(help="Held-apart prompts per task in the warm-start runs (at most 20).")] = 20,
    profile_chars: Annotated[int, typer.Option(help="Profile on this many characters of each half (0: all).")] = 0,
    out: Annotated[Path, typer.Option(help="JSON to write (a .md table beside it).")] = Path("eval_patterns.json"),
) -> None:
    """Pruning's perplexity, warm start's misses and the matching accuracy on the bundled models."""
    torch.set_num_threads(1)  # a shared 2-core machine: one thread each avoids OpenMP spinning against others
    halves = texts(profile_chars)
    result: dict[str, Any] = {"pruning": [], "warm_start": {}, "threshold_sweep": []}
    tiny = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name in [m.strip() for m in models.split(",") if m.strip()]:
            pruned = pruning(name, halves, folder, max_tokens, context)
            result["pruning"] += pruned["rows"]
            tiny[name] = pruned["patterns"]
            runs = warm_start(name, folder, new_tokens, budget, count)
            accuracy = matching_accuracy(name, folder / f"{name}-prompt-patterns.json", count)
            result["warm_start"][name] = {"runs": runs, "accuracy": accuracy["loglik"],
                                          "cosine_accuracy": accuracy["cosine"],
                                          "generic_fallbacks": accuracy["generic_fallbacks"]}
            if sweep:
                result["threshold_sweep"] += threshold_sweep(name, halves, folder, max_tokens, context)
    result["simulated"] = simulations(tiny)
    result["params"] = {"models": models, "max_tokens": max_tokens, "context": context, "new_tokens": new_tokens,
                        "budget": budget, "count": count, "profile_chars": profile_chars,
                        "disk_bytes_per_s": DISK_BYTES_PER_S, "targets": TARGETS}
    write_json(out, {"benchmark": "eval_patterns", "machine": machine_info(), **result})
    write_text(out.with_suffix(".md"), tables(result) + "\n")
    print(tables(result))


if __name__ == "__main__":
    main(app)
