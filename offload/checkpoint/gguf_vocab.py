"""The tokenizer and chat template a GGUF file embeds (``tokenizer.ggml.*``, ``tokenizer.chat_template``), built as a
``tokenizers.Tokenizer`` that splits text as llama.cpp's own tokenizer does (src/llama-vocab.cpp):

- ``gpt2`` (byte-level BPE): the merges in the file; the text split by the pre-tokenizer regexes the file names
  (``tokenizer.ggml.pre``: llama.cpp keeps them in its source, so they are a table here, one row per name), applied
  one after another, then byte-encoded; llama.cpp's ``llama3`` family also takes a whole split that is a token as it is
  (``ignore_merges``);
- ``llama`` (SentencePiece): merges ranked by the score of the piece they make (llama.cpp's SPM tokenizer merges the
  best-scoring pair first), bytes the vocabulary lacks as ``<0xXX>`` tokens, a space put before the text and after
  each special token, spaces written as "▁".

Control and user-defined tokens are matched in the text before it is split, as llama.cpp does with special tokens
parsed; ``add_bos`` / ``add_eos`` become the post-processor.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from offload.errors import CheckpointError, UnsupportedModelError

CONTROL, USER_DEFINED, BYTE = 3, 4, 6  # tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
          r"\s+(?!\S)|\s+")
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
           r"\s*[\r\n]+|\s+(?!\S)|\s+")
_O200K = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|"
          r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|"
          r"\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_DEEPSEEK3 = (r"\p{N}{1,3}", r"[一-龥぀-ゟ゠-ヿ]+",
              r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+"
              r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclass(frozen=True)
class PreTokenizer:
    """One ``tokenizer.ggml.pre``: the regexes llama.cpp splits with, in order, and whether it keeps whole tokens."""

    regexes: tuple[str, ...]
    ignore_merges: bool = False


_PRE = {
    "gpt2": PreTokenizer((_GPT2,)), "qwen2": PreTokenizer((_QWEN2,)), "llama3": PreTokenizer((_LLAMA3,), True),
    "o200k": PreTokenizer((_O200K,)), "deepseek3": PreTokenizer(_DEEPSEEK3),
    "glm4": PreTokenizer((_LLAMA3,)),  # llama.cpp's CHATGLM4: llama3's regex without ignore_merges
    "default": PreTokenizer((r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]")),
}
# tokenizer.ggml.pre names (as llama.cpp's converter writes them) -> the row above
PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    **{name: _PRE["gpt2"] for name in ("gpt-2", "gpt2", "olmo", "mpt", "jais", "phi-2")},
    **{name: _PRE["qwen2"] for name in ("qwen2", "deepseek-r1-qwen", "megrez", "stablelm2", "hunyuan")},
    **{name: _PRE["llama3"] for name in ("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral", "dbrx", "smaug-bpe")},
    **{name: _PRE["o200k"] for name in ("gpt-4o", "llama4", "minimax-m2")},
    "deepseek-v3": _PRE["deepseek3"], "glm4": _PRE["glm4"], "chatglm-bpe": _PRE["glm4"], "default": _PRE["default"],
}


def _need(kv: Mapping[str, Any], key: str) -> Any:
    if key not in kv:
        raise CheckpointError(f"GGUF metadata lacks {key}", "the file's tokenizer is incomplete: re-download it")
    return kv[key]


def _special_tokens(tokens: list[str], types: list[int]) -> list[AddedToken]:
    """Control tokens (special) and user-defined ones, matched whole in the text before it is split."""
    return [AddedToken(tok, special=kind == CONTROL, normalized=False)
            for tok, kind in zip(tokens, types, strict=True) if kind in (CONTROL, USER_DEFINED)]


def _post_processor(kv: Mapping[str, Any], tokens: list[str], add_bos_default: bool):
    """``add_bos`` / ``add_eos`` as a template around every encoded text (None when neither is added)."""
    template, special = ["$A"], {}
    for key, default, at in (("bos", add_bos_default, 0), ("eos", False, 2)):
        token_id = kv.get(f"tokenizer.ggml.{key}_token_id")
        if kv.get(f"tokenizer.ggml.add_{key}_token", default) and token_id is not None:
            template.insert(at, tokens[int(token_id)])
            special[tokens[int(token_id)]] = int(token_id)
    if not special:
        return None
    return processors.TemplateProcessing(single=" ".join(template), special_tokens=list(special.items()))


def _gpt2(kv: Mapping[str, Any], tokens: list[str], types: list[int]) -> Tokenizer:
    name = str(kv.get("tokenizer.ggml.pre", "default"))
    pre = PRE_TOKENIZERS.get(name)
    if pre is None:
        raise UnsupportedModelError(f"GGUF pre-tokenizer {name!r} is not supported yet",
                                    f"offload splits text as llama.cpp for: {', '.join(sorted(PRE_TOKENIZERS))}")
    merges = [tuple(m.split(" ", 1)) for m in _need(kv, "tokenizer.ggml.merges")]
    vocab = {tok: i for i, tok in reversed(list(enumerate(tokens)))}  # a repeated piece keeps its first id
    tok = Tokenizer(models.BPE(vocab, merges, ignore_merges=pre.ignore_merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in pre.regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(_special_tokens(tokens, types))
    return tok


def _spm_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """SentencePiece BPE as ranked merges: every split of a piece into two pieces, the best-scoring piece first (the
    pair llama.cpp's SPM tokenizer would merge first), ties in vocabulary order."""
    ids = {tok: i for i, tok in reversed(list(enumerate(tokens)))}
    merges = []
    for piece, score in zip(tokens, scores, strict=True):
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in ids and right in ids:
                merges.append((-score, ids[left], ids[right], left, right))
    merges.sort()
    return [(left, right) for *_, left, right in merges]


def _llama(kv: Mapping[str, Any], tokens: list[str], types: list[int]) -> Tokenizer:
    scores = list(kv.get("tokenizer.ggml.scores") or [0.0] * len(tokens))
    vocab = {tok: i for i, tok in reversed(list(enumerate(tokens)))}
    unk_id = kv.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[int(unk_id)] if unk_id is not None else None
    tok = Tokenizer(models.BPE(vocab, _spm_merges(tokens, scores), unk_token=unk, fuse_unk=True,
                               byte_fallback=BYTE in types))
    space_prefix = bool(kv.get("tokenizer.ggml.add_space_prefix", True))
    tok.normalizer = normalizers.Sequence([*([normalizers.Prepend("▁")] if space_prefix else []),
                                           normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     *([decoders.Strip(" ", 1, 0)] if space_prefix else [])])
    tok.add_special_tokens(_special_tokens(tokens, types))
    return tok


# tokenizer.ggml.model -> (builder, whether llama.cpp adds bos unless the file says otherwise)
TOKENIZER_MODELS = {"gpt2": (_gpt2, False), "llama": (_llama, True)}


def gguf_tokenizer(kv: Mapping[str, Any]) -> Tokenizer | None:
    """The tokenizer a GGUF file's metadata describes; None when it embeds none."""
    model = kv.get("tokenizer.ggml.model")
    if model is None or model in ("none", "no_vocab"):
        return None
    if model not in TOKENIZER_MODELS:
        raise UnsupportedModelError(f"GGUF tokenizer model {model!r} is not supported",
                                    f"offload builds {', '.join(TOKENIZER_MODELS)} tokenizers from GGUF files")
    build, add_bos = TOKENIZER_MODELS[model]
    tokens = list(_need(kv, "tokenizer.ggml.tokens"))
    types = list(kv.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    tok = build(kv, tokens, types)
    post = _post_processor(kv, tokens, add_bos)
    if post is not None:
        tok.post_processor = post
    return tok


def gguf_special_tokens(kv: Mapping[str, Any]) -> dict[str, str]:
    """bos_token, eos_token, ... by text, as a chat template sees them."""
    tokens = kv.get("tokenizer.ggml.tokens") or []
    out = {}
    for name, key in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"), ("pad_token", "padding"),
                      ("sep_token", "seperator"), ("mask_token", "mask")):  # llama.cpp spells "seperator"
        token_id = kv.get(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None and 0 <= int(token_id) < len(tokens):
            out[name] = tokens[int(token_id)]
    return out
