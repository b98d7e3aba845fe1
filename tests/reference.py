"""Slow, obviously-correct oracles that the fast code is checked against.

Each section holds the oracles of one part of the project; nothing here imports the project, so
an oracle cannot share a bug with the code it checks. ``from tests import reference`` with the
repository root on ``sys.path`` (pytest puts it there; scripts/common.py does for the scripts).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache

# ================================================================================================
# Simulator oracles (checked against offload/simulate.py)
#
# One cache object per partition; ``access(key) -> (hit, evicted key or None)``. A miss always
# inserts. Keys are ints; ``i`` is the access's index in the whole stream (Belady looks ahead
# from it, LFU uses it as the time of last use).
# ================================================================================================


class RefLRU:
    """LRU: an OrderedDict kept in order of last use, oldest first."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.keys: OrderedDict[int, None] = OrderedDict()

    def access(self, key: int, i: int) -> tuple[bool, int | None]:
        if key in self.keys:
            self.keys.move_to_end(key)
            return True, None
        evicted = self.keys.popitem(last=False)[0] if len(self.keys) == self.capacity else None
        self.keys[key] = None
        return False, evicted


class RefFIFO:
    """FIFO: a deque in order of insertion; a hit changes nothing."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.queue: deque[int] = deque()

    def access(self, key: int, i: int) -> tuple[bool, int | None]:
        if key in self.queue:
            return True, None
        evicted = self.queue.popleft() if len(self.queue) == self.capacity else None
        self.queue.append(key)
        return False, evicted


class RefLFU:
    """LFU: fewest accesses since the trace start (kept across evictions), ties by least recent use."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.resident: set[int] = set()
        self.count: dict[int, int] = {}
        self.last: dict[int, int] = {}

    def access(self, key: int, i: int) -> tuple[bool, int | None]:
        self.count[key] = self.count.get(key, 0) + 1
        self.last[key] = i
        if key in self.resident:
            return True, None
        evicted = None
        if len(self.resident) == self.capacity:
            evicted = min(self.resident, key=lambda k: (self.count[k], self.last[k]))
            self.resident.remove(evicted)
        self.resident.add(key)
        return False, evicted


class RefBelady:
    """Belady's MIN: evict the key whose next use is farthest, found by scanning the future."""

    def __init__(self, capacity: int, stream: Sequence[int]) -> None:
        self.capacity = capacity
        self.stream = stream
        self.resident: set[int] = set()

    def _next_use(self, key: int, i: int) -> float:
        for j in range(i + 1, len(self.stream)):
            if self.stream[j] == key:
                return j
        return float("inf")

    def access(self, key: int, i: int) -> tuple[bool, int | None]:
        if key in self.resident:
            return True, None
        evicted = None
        if len(self.resident) == self.capacity:
            # never-used-again keys tie at infinity; the larger key goes first, as in the simulator
            evicted = max(self.resident, key=lambda k: (self._next_use(k, i), k))
            self.resident.remove(evicted)
        self.resident.add(key)
        return False, evicted


@dataclass
class RefCounts:
    """Per-key counts; evictions are charged to the evicted key."""

    hits: dict[int, int] = field(default_factory=dict)
    misses: dict[int, int] = field(default_factory=dict)
    evictions: dict[int, int] = field(default_factory=dict)


def ref_simulate(stream: Sequence[int], policy: str, capacity: int,
                 partition: Callable[[int], int] = lambda key: 0) -> RefCounts:
    """Run ``stream`` through one cache of ``capacity`` per partition (``partition(key)``)."""
    make: dict[str, Callable[[], object]] = {
        "lru": lambda: RefLRU(capacity), "fifo": lambda: RefFIFO(capacity),
        "lfu": lambda: RefLFU(capacity), "belady": lambda: RefBelady(capacity, stream),
    }
    caches: dict[int, object] = {}
    out = RefCounts()
    for i, key in enumerate(stream):
        cache = caches.setdefault(partition(key), make[policy]())
        hit, evicted = cache.access(key, i)  # type: ignore[attr-defined]
        bucket = out.hits if hit else out.misses
        bucket[key] = bucket.get(key, 0) + 1
        if evicted is not None:
            out.evictions[evicted] = out.evictions.get(evicted, 0) + 1
    return out


def optimal_misses(stream: Sequence[int], capacity: int) -> int:
    """Fewest misses of any demand-paging cache (a miss inserts, any resident may go), by exhaustive search."""

    @cache
    def best(i: int, resident: frozenset[int]) -> int:
        if i == len(stream):
            return 0
        key = stream[i]
        if key in resident:
            return best(i + 1, resident)
        if len(resident) < capacity:
            return 1 + best(i + 1, resident | {key})
        return 1 + min(best(i + 1, (resident - {v}) | {key}) for v in resident)

    return best(0, frozenset())


def ref_simulate_steps(stream: Sequence[int], policy: str, capacity: int, num_experts: int, top_k: int,
                       partition: Callable[[int], int] = lambda key: 0, pin_steps: bool = True) -> RefCounts:
    """Layer steps of ``top_k`` keys (one token at one layer), each victim found by scanning every candidate.

    With ``pin_steps`` a step runs as the runtime's MoE layer does: its resident keys first, then the
    missing ones, each group in key order, all pinned until the step ends; a miss evicts the policy's
    choice among the other resident keys of its cache, or, when there are none, the step's earliest
    used key. Without it the keys run in the trace's order and nothing is pinned (lru, lfu, fifo and
    belady then equal ``ref_simulate``). Policies: lru, lfu, fifo, belady, and layer-lru: the key
    whose layer's next visit is farthest (the current layer counts a whole cycle away), then the
    least recently used, never one of the current step's keys while another candidate exists.
    """
    num_layers = max(stream) // num_experts + 1 if stream else 1
    resident: dict[int, set[int]] = {}
    inserted: dict[int, int] = {}  # key -> time it became resident
    last: dict[int, int] = {}  # key -> time of last use
    count: dict[int, int] = {}  # key -> uses since the start (kept across evictions)
    out = RefCounts()
    clock = 0

    def next_use(key: int, start: int) -> float:
        return next((j for j in range(start, len(stream)) if stream[j] == key), float("inf"))

    def pick(candidates: set[int], start: int, layer: int, step: list[int]) -> int:
        if policy == "lru":
            return min(candidates, key=lambda k: last[k])
        if policy == "fifo":
            return min(candidates, key=lambda k: inserted[k])
        if policy == "lfu":
            return min(candidates, key=lambda k: (count[k], last[k]))
        if policy == "belady":
            return max(candidates, key=lambda k: (next_use(k, start), k))
        others = candidates - set(step) or candidates  # layer-lru
        return max(others, key=lambda k: ((k // num_experts - layer - 1) % num_layers + 1, -last[k]))

    for start in range(0, len(stream), top_k):
        keys = list(stream[start:start + top_k])
        layer = keys[0] // num_experts
        cache = resident.setdefault(partition(keys[0]), set())
        if pin_steps:
            keys = sorted(k for k in keys if k in cache) + sorted(k for k in keys if k not in cache)
        held: list[int] = []
        for position, key in enumerate(keys):
            clock += 1
            count[key] = count.get(key, 0) + 1
            hit = key in cache
            bucket = out.hits if hit else out.misses
            bucket[key] = bucket.get(key, 0) + 1
            if not hit:
                if len(cache) == capacity:
                    candidates = cache - set(held) if pin_steps else set(cache)
                    # belady looks ahead from the next step when pinned (the step's own keys are not candidates)
                    ahead = start + top_k if pin_steps else start + position + 1
                    victim = (pick(candidates, ahead, layer, held) if candidates
                              else next(h for h in held if h in cache))
                    cache.remove(victim)
                    out.evictions[victim] = out.evictions.get(victim, 0) + 1
                cache.add(key)
                inserted[key] = clock
            last[key] = clock
            held.append(key)
    return out


# ================================================================================================
# Quantization oracles (checked against offload/experts/quant.py)
#
# Plain-Python loops over words and bits, written from the formats' descriptions (AutoGPTQ's pack and
# dequantization, compressed-tensors' pack_to_int32), not from offload's code. W[o, i] is the weight of
# output o and input i; codes are unsigned and W = scale * (code - zero).
# ================================================================================================


def ref_gptq_dequantize(qweight, qzeros, scales, g_idx, bits: int):
    """GPTQ v1 tensors -> float32 [out, in], one weight at a time. g_idx may be any assignment of groups."""
    import torch

    per, mask = 32 // bits, (1 << bits) - 1
    qw, qz, sc, gi = qweight.tolist(), qzeros.tolist(), scales.float().tolist(), g_idx.tolist()
    rows, out = len(qw), len(qw[0])
    w = [[0.0] * (rows * per) for _ in range(out)]
    for r in range(rows):
        for o in range(out):
            word = qw[r][o] & 0xFFFFFFFF  # int32 -> its 32 bits
            for j in range(per):
                i = r * per + j
                g = gi[i]
                q = (word >> (bits * j)) & mask
                zword = qz[g][o // per] & 0xFFFFFFFF
                zero = (((zword >> (bits * (o % per))) & mask) + 1) & mask  # stored zero - 1 (AutoGPTQ)
                w[o][i] = sc[g][o] * (q - zero)
    return torch.tensor(w, dtype=torch.float32)


def _ref_field(word_rows, index: int, bits: int, row: int) -> int:
    """The ``index``-th bits-wide field of a row of int32 words, low bits first, as an unsigned int."""
    bit = index * bits
    word = word_rows[row][bit // 32] & 0xFFFFFFFF
    return (word >> (bit % 32)) & ((1 << bits) - 1)


def ref_compressed_tensors_dequantize(weight_packed, weight_scale, weight_shape, weight_zero_point, bits: int,
                                      group_size: int | None):
    """compressed-tensors pack-quantized tensors -> float32 [out, in]; weight_zero_point None when symmetric."""
    import torch

    out, in_ = (int(v) for v in weight_shape.tolist())
    group = group_size or in_
    offset = 1 << (bits - 1)  # stored = signed + offset
    packed, scale = weight_packed.tolist(), weight_scale.float().tolist()
    zp = None if weight_zero_point is None else weight_zero_point.t().tolist()  # packed along out: [groups, words]
    w = [[0.0] * in_ for _ in range(out)]
    for o in range(out):
        for i in range(in_):
            g = i // group
            q = _ref_field(packed, i, bits, o) - offset
            z = 0 if zp is None else _ref_field(zp, o, bits, g) - offset
            w[o][i] = scale[o][g] * (q - z)
    return torch.tensor(w, dtype=torch.float32)


def ref_rtn(w, bits: int, group_size: int | None, symmetric: bool):
    """Round-to-nearest, one group of columns at a time -> (codes uint8, scales float32, zeros float32).

    Symmetric: scale = 2 * absmax / (2^bits - 1), zero = 2^(bits-1) (GPTQ's and compressed-tensors' grid);
    asymmetric: scale = (max - min) / (2^bits - 1) over a range that includes 0, zero = round(-min / scale).
    """
    import torch

    w = w.float()
    in_ = w.shape[1]
    group, maxq = group_size or in_, (1 << bits) - 1
    codes, scales, zeros = [], [], []
    for c in range(0, in_, group):
        x = w[:, c : c + group]
        if symmetric:
            scale = (2 * x.abs().amax(1) / maxq).clamp_min(torch.finfo(torch.float32).tiny)
            zero = torch.full_like(scale, 1 << (bits - 1))
        else:
            lo, hi = x.amin(1).clamp_max(0), x.amax(1).clamp_min(0)
            scale = ((hi - lo) / maxq).clamp_min(torch.finfo(torch.float32).tiny)
            zero = (-lo / scale).round().clamp(0, maxq)
        codes.append((x / scale[:, None]).round().add(zero[:, None]).clamp(0, maxq))
        scales.append(scale)
        zeros.append(zero)
    return torch.cat(codes, 1).to(torch.uint8), torch.stack(scales, 1), torch.stack(zeros, 1)


def ref_dequantize(codes, scales, zeros, group_size: int | None):
    """W = scale * (code - zero), weight by weight through repeat_interleave (no reshapes to get wrong)."""
    group = group_size or codes.shape[1]
    s = scales.float().repeat_interleave(group, dim=1)
    z = zeros.float().repeat_interleave(group, dim=1)
    return s * (codes.float() - z)


def ref_linear(x, w):
    """x [tokens, in] @ w [out, in].T in float32: what every quantized matmul is checked against."""
    return x.float() @ w.float().t()


def ref_rms_norm(x, weight, eps: float):
    """RMSNorm in float64, row by row: x / sqrt(mean(x^2) + eps) * weight."""
    x64 = x.double()
    return x64 / (x64.pow(2).mean(-1, keepdim=True) + eps).sqrt() * weight.double()


def _e2m1(code: int) -> float:
    """An FP4 E2M1 code from its bits: sign, 2 exponent bits (bias 1), 1 mantissa bit; exponent 0 is subnormal."""
    sign = -1.0 if code & 8 else 1.0
    exponent, mantissa = (code >> 1) & 3, code & 1
    return sign * (mantissa * 0.5 if exponent == 0 else (1 + mantissa / 2) * 2.0 ** (exponent - 1))


def ref_mxfp4_dequantize(blocks, scales):
    """MXFP4 -> float64 [out, in], byte by byte: low nibble first, each 32-weight block times 2^(scale - 127)."""
    import torch

    out, groups, half = blocks.shape
    w = torch.empty(out, groups * 2 * half, dtype=torch.float64)
    for r in range(out):
        for g in range(groups):
            scale = 2.0 ** (int(scales[r, g]) - 127)
            for j, byte in enumerate(blocks[r, g].tolist()):
                w[r, g * 2 * half + 2 * j] = _e2m1(byte & 15) * scale
                w[r, g * 2 * half + 2 * j + 1] = _e2m1(byte >> 4) * scale
    return w


def _e4m3(byte: int) -> float:
    """An FP8 e4m3fn value from its bits: sign, 4 exponent bits (bias 7), 3 mantissa bits; S.1111.111 is NaN."""
    sign = -1.0 if byte & 0x80 else 1.0
    exponent, mantissa = (byte >> 3) & 15, byte & 7
    if exponent == 15 and mantissa == 7:
        return float("nan")
    return sign * (mantissa / 8 * 2.0 ** -6 if exponent == 0 else (1 + mantissa / 8) * 2.0 ** (exponent - 7))


def ref_fp8_block_dequantize(w_bytes, scale_inv, block: tuple[int, int]):
    """FP8 e4m3 bytes [out, in] with a scale per block -> float64, weight by weight."""
    import torch

    out, inn = w_bytes.shape
    table = torch.tensor([_e4m3(b) for b in range(256)], dtype=torch.float64)
    w = table[w_bytes.long()]
    rows = torch.arange(out)[:, None] // block[0]
    cols = torch.arange(inn)[None, :] // block[1]
    return w * scale_inv.double()[rows, cols]


def ref_spm_tokenize(text: str, tokens: list[str], scores: list[float], byte_tokens: bool = True,
                     space_prefix: bool = True) -> list[int]:
    """llama.cpp's SentencePiece tokenizer (llm_tokenizer_spm), slowly: a space in front, spaces as "▁", then merge
    the adjacent pair whose concatenation is the best-scoring token (the leftmost among equals) until none is; a
    piece that is not a token becomes its UTF-8 bytes as <0xXX> tokens."""
    ids = {t: i for i, t in reversed(list(enumerate(tokens)))}
    text = ((" " if space_prefix else "") + text).replace(" ", "\u2581")
    symbols = list(text)
    while True:
        best = None
        for i in range(len(symbols) - 1):
            merged = symbols[i] + symbols[i + 1]
            if merged in ids and (best is None or scores[ids[merged]] > scores[ids[best[1]]]):
                best = (i, merged)
        if best is None:
            break
        i, merged = best
        symbols[i:i + 2] = [merged]
    out = []
    for s in symbols:
        if s in ids:
            out.append(ids[s])
        elif byte_tokens:
            out.extend(ids[f"<0x{b:02X}>"] for b in s.encode())
    return out


# ================================================================================================
# Gated DeltaNet oracles (checked against offload/model/deltanet.py): the rule token by token, in
# float64, as its paper writes it (Yang, Kautz & Hatamizadeh 2024, eq. 10), and the causal conv as a sum.
# ================================================================================================


def ref_gated_delta_rule(q, k, v, g, beta, state):
    """q, k [b, h, t, dk], v [b, h, t, dv], g, beta [b, h, t], state [b, h, dk, dv] -> (outputs, final state), float64.

    Per token: S <- exp(g) S; S <- S + k (beta (v - S^T k))^T; o = S^T q, with one loop over (row, head, token).
    """
    import torch

    q, k, v, g, beta, s = (x.double() for x in (q, k, v, g, beta, state))
    s = s.clone()
    out = torch.zeros(*v.shape, dtype=torch.float64)
    b, h, t, _ = k.shape
    for r in range(b):
        for head in range(h):
            for i in range(t):
                s[r, head] *= torch.exp(g[r, head, i])
                predicted = s[r, head].t() @ k[r, head, i]            # [dv]: what the state recalls for k
                s[r, head] += torch.outer(k[r, head, i], beta[r, head, i] * (v[r, head, i] - predicted))
                out[r, head, i] = s[r, head].t() @ q[r, head, i]
    return out, s


def ref_causal_conv(x, weight):
    """x [b, t, c] from zeros, weight [c, 1, kernel] -> silu(sum_j w[c, kernel-1-j] x[t-j]) [b, t, c], float64."""
    import torch

    x, w = x.double(), weight.double()[:, 0]
    kernel = w.shape[1]
    out = torch.zeros_like(x)
    for i in range(x.shape[1]):
        for j in range(min(kernel, i + 1)):
            out[:, i] += w[:, kernel - 1 - j] * x[:, i - j]
    return out * torch.sigmoid(out)
