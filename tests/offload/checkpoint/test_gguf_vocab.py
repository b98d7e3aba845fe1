"""The tokenizer a GGUF file embeds, rebuilt from ``tokenizer.ggml.*``: byte-level BPE gives the original tokenizer's
ids (its pre-tokenizer named by ``tokenizer.ggml.pre``), SentencePiece gives what llama.cpp's SPM algorithm gives
(tests/reference.py), on text with code, unicode, whitespace runs and special tokens; the chat template and special
tokens come from the file."""

from __future__ import annotations

import gguf
import pytest
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from offload.checkpoint.gguf import read_gguf
from offload.checkpoint.gguf_vocab import gguf_special_tokens, gguf_tokenizer
from offload.serve.chat import resolve_chat_template
from tests.reference import ref_spm_tokenize

# Qwen2's pre-tokenizer regex as its tokenizer.json writes it (llama.cpp's "qwen2")
QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
         r"\s+(?!\S)|\s+")
CORPUS = [
    "def fibonacci(n: int) -> int:\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "The quick brown fox jumps over the lazy dog. It's 2026; we've said 'hello' 1234567 times!",
    "Grüße aus Köln — naïve café, résumé. 日本語のテキストと中文文本。 Emoji: 🚀🦙✅",
    "for (int i = 0; i < 10; ++i) {\n\tprintf(\"%d\\n\", i);\n}\n\n\n    indented    with   runs\t\ttabs",
] * 3
TEXTS = [
    "def add(a, b):\n    return a + b  # sum\n",
    "  leading spaces, trailing spaces   \n\n\n\t\tand tabs",
    "Ünïcödé: 日本語, emoji 🚀🦙, and a rare 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 letter",
    "It's they'LL WE'VE  1234567890 3.14159",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "",
]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@pytest.fixture(scope="module")
def bpe():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=420, special_tokens=SPECIALS, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def _bpe_kv(tok: Tokenizer, pre: str = "qwen2") -> dict:
    import json

    model = json.loads(tok.to_str())["model"]
    tokens = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": [3 if t in SPECIALS else 1 for t in tokens], "tokenizer.ggml.merges": merges,
            "tokenizer.ggml.eos_token_id": tokens.index("<|im_end|>"),
            "tokenizer.ggml.bos_token_id": tokens.index("<|endoftext|>"), "tokenizer.ggml.add_bos_token": False,
            "tokenizer.chat_template": "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
                                       "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"}


def test_byte_level_bpe_gives_the_original_ids(bpe):
    ours = gguf_tokenizer(_bpe_kv(bpe))
    for text in TEXTS:
        assert ours.encode(text).ids == bpe.encode(text).ids, text
        assert ours.decode(ours.encode(text).ids, skip_special_tokens=False) == text


def test_add_bos_and_an_unknown_pre_tokenizer(bpe):
    kv = {**_bpe_kv(bpe), "tokenizer.ggml.add_bos_token": True}
    ids = gguf_tokenizer(kv).encode("hello").ids
    assert ids == [kv["tokenizer.ggml.bos_token_id"], *bpe.encode("hello").ids]
    from offload.errors import UnsupportedModelError
    with pytest.raises(UnsupportedModelError, match="GGUF pre-tokenizer 'nonesuch' is not supported yet.*qwen2"):
        gguf_tokenizer(_bpe_kv(bpe, pre="nonesuch"))


def test_the_file_round_trip_and_its_chat_template(bpe, tmp_path):
    kv = _bpe_kv(bpe)
    w = gguf.GGUFWriter(tmp_path / "v.gguf", "qwen3moe")
    w.add_tokenizer_model("gpt2"), w.add_tokenizer_pre("qwen2"), w.add_token_list(kv["tokenizer.ggml.tokens"])
    w.add_token_types(kv["tokenizer.ggml.token_type"]), w.add_token_merges(kv["tokenizer.ggml.merges"])
    w.add_eos_token_id(kv["tokenizer.ggml.eos_token_id"]), w.add_bos_token_id(kv["tokenizer.ggml.bos_token_id"])
    w.add_chat_template(kv["tokenizer.chat_template"])
    w.add_tensor("token_embd.weight", __import__("numpy").zeros((4, 32), dtype="float32"))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    meta = read_gguf(tmp_path / "v.gguf").metadata
    assert gguf_tokenizer(meta).encode(TEXTS[0]).ids == bpe.encode(TEXTS[0]).ids
    assert gguf_special_tokens(meta) == {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>"}
    template = resolve_chat_template(tmp_path / "v.gguf", meta)
    assert template.origin.endswith("(tokenizer.chat_template)")
    assert template.render([{"role": "user", "content": "hi"}]) == "<|im_start|>user\nhi<|im_end|>\n" \
                                                                   "<|im_start|>assistant\n"


def _spm_vocab() -> tuple[list[str], list[float], list[int]]:
    """A SentencePiece-style vocabulary: <unk> <s> </s>, 256 byte tokens, then pieces with falling scores."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.pre_tokenizer = pre_tokenizers.Split("\u2581", behavior="merged_with_next")
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, show_progress=False))
    pieces = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *pieces]
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    return tokens, scores, types


def test_sentencepiece_gives_llama_cpps_spm_ids():
    tokens, scores, types = _spm_vocab()
    kv = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores,
          "tokenizer.ggml.token_type": types, "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
          "tokenizer.ggml.unknown_token_id": 0}
    ours = gguf_tokenizer(kv)
    for text in TEXTS[:4]:
        assert ours.encode(text).ids == [1, *ref_spm_tokenize(text, tokens, scores)], text  # add_bos: llama's default
        assert ours.decode(ours.encode(text).ids) == text  # bos dropped as special
