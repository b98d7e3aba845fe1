"""offload.serve.chat renders a conversation to the same string as transformers' apply_chat_template on the same files,
finds templates where transformers finds them, and ends bad messages or a template's refusal in one ConfigError
naming the field or the template file.

Equality is exact (string ==): a prompt that differs by one space is a prompt the model was not tuned on. The
fixture templates under tests/data/chat_templates/ are written from the hub's Mixtral-Instruct, Mistral-Instruct
v0.1, Qwen3 and Llama-3.1 templates; each test folder pairs one with a character tokenizer.json and a
tokenizer_config.json shaped like that model's.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pytest

from offload.checkpoint.locate import BUNDLED_DIR
from offload.errors import CheckpointError, ConfigError
from offload.serve.chat import (
    FALLBACK_TEMPLATE,
    ChatTemplate,
    encode_chat,
    fallback_chat_template,
    load_chat_template,
    read_special_tokens,
    resolve_chat_template,
    validate_messages,
)
from tests.paths import DATA
from tests.tiny_models import add_char_tokenizer

transformers = pytest.importorskip("transformers")

TEMPLATES = DATA / "chat_templates"
TINY_MOE = BUNDLED_DIR / "tiny-moe"

# tokenizer_config.json contents shaped like each model's on the hub (the fields templates and loading read)
CONFIGS = {
    "mixtral": {  # Llama-2-era layout: special tokens as AddedToken dicts
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "legacy": True,
        "bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": False, "normalized": True,
                      "rstrip": False, "single_word": False},
        "eos_token": {"__type": "AddedToken", "content": "</s>", "lstrip": False, "normalized": True,
                      "rstrip": False, "single_word": False},
        "unk_token": "<unk>", "pad_token": None,
    },
    "qwen3": {
        "tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "unk_token": None, "errors": "replace", "split_special_tokens": False,
    },
    "llama3": {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
        "model_input_names": ["input_ids", "attention_mask"], "clean_up_tokenization_spaces": True,
    },
}
FILES = {"mixtral": "mixtral-instruct.jinja", "qwen3": "qwen3.jinja", "llama3": "llama3.jinja"}

SYSTEM = {"role": "system", "content": "You are a careful assistant.\nAnswer briefly."}
CHATS = {
    "one user turn": [{"role": "user", "content": "What is an expert cache?"}],
    "system first": [SYSTEM, {"role": "user", "content": "Hi  there "}],
    "multi-turn": [SYSTEM, {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                   {"role": "user", "content": "And 3+3?"}],
    "ends with assistant": [{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "7"}],
}


def make_folder(folder: Path, config: dict | None, template: str | None = None) -> Path:
    """A tokenizer folder: the character tokenizer.json, tokenizer_config.json and optionally chat_template.jinja."""
    folder.mkdir(parents=True, exist_ok=True)
    add_char_tokenizer(folder)
    if config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    if template is not None:
        (folder / "chat_template.jinja").write_text(template)
    return folder


def hf_render(folder: Path, messages: list[dict], **kwargs) -> str:
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory):
    """family_dir(name) -> a folder with that family's template as chat_template.jinja (made once)."""
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            template = (TEMPLATES / FILES[name]).read_text()
            made[name] = make_folder(tmp_path_factory.mktemp(name), CONFIGS[name], template)
        return made[name]

    return get


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("chat", list(CHATS))
@pytest.mark.parametrize("family", list(FILES))
def test_families_render_as_transformers(family_dir, family, chat, add_generation_prompt):
    folder = family_dir(family)
    extra = {"date_string": "26 Jul 2024"} if family == "llama3" else {}  # a fixed date: no race with midnight
    ours = load_chat_template(folder).render(CHATS[chat], add_generation_prompt=add_generation_prompt, **extra)
    assert ours == hf_render(folder, CHATS[chat], add_generation_prompt=add_generation_prompt, **extra)


def test_mixtral_layout_is_the_known_one(family_dir):
    """Equality with transformers could hide both being wrong; this is Mixtral-Instruct's documented layout."""
    chat = CHATS["multi-turn"]
    text = load_chat_template(family_dir("mixtral")).render(chat)
    assert text == ("<s> [INST] You are a careful assistant.\nAnswer briefly.\n\n2+2? [/INST] 4</s>"
                    " [INST] And 3+3? [/INST]")


TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in Zürich & <city> (it's \"live\")",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


@pytest.mark.parametrize("extra", [
    {"enable_thinking": False},
    {"enable_thinking": True},
    {"tools": TOOLS},  # tojson must not HTML-escape < & ' and must keep ü (ensure_ascii=False)
], ids=["no thinking", "thinking", "tools"])
def test_qwen3_extras_render_as_transformers(family_dir, extra):
    folder = family_dir("qwen3")
    ours = load_chat_template(folder).render(CHATS["multi-turn"], **extra)
    assert ours == hf_render(folder, CHATS["multi-turn"], add_generation_prompt=True, **extra)
    if "tools" in extra:
        assert '"Weather in Zürich & <city> (it\'s \\"live\\")"' in ours


def test_qwen3_reasoning_and_tool_calls_render_as_transformers(family_dir):
    """reasoning_content, an older "reasoning" field (copied to reasoning_content as transformers does), tool calls
    and tool results: the keys beyond role and content pass through to the template."""
    chat = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "reasoning": "I should call the tool.", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "18 C, sunny"},
        {"role": "assistant", "content": "It is 18 C and sunny.", "reasoning_content": "The tool said so."},
        {"role": "user", "content": "Thanks", "name": None},
    ]
    folder = family_dir("qwen3")
    ours = load_chat_template(folder).render(chat, tools=TOOLS)
    assert ours == hf_render(folder, chat, add_generation_prompt=True, tools=TOOLS)
    assert "I should call the tool." not in ours  # Qwen3 drops the reasoning of turns before the last query
    # after the last query it is kept, read from reasoning_content, which an older "reasoning" key fills
    chat = chat[:1] + [{"role": "assistant", "content": "Sunny.", "reasoning": "Guessing."}]
    ours = load_chat_template(folder).render(chat, add_generation_prompt=False)
    assert ours == hf_render(folder, chat, add_generation_prompt=False)
    assert "<think>\nGuessing.\n</think>\n\nSunny." in ours


def test_llama3_tools_and_today_render_as_transformers(family_dir):
    folder = family_dir("llama3")
    template = load_chat_template(folder)
    chat = CHATS["multi-turn"]
    assert template.render(chat, tools=TOOLS, date_string="1 Jan 2025") == hf_render(
        folder, chat, add_generation_prompt=True, tools=TOOLS, date_string="1 Jan 2025")
    # No date_string: the template asks strftime_now for today's date, on both sides
    day = datetime.now().date()
    ours, theirs = template.render(chat), hf_render(folder, chat, add_generation_prompt=True)
    if datetime.now().date() != day:
        pytest.skip("the date changed between the two renderings")
    assert ours == theirs
    assert "Today Date: " + datetime.now().strftime("%d %b %Y") in ours


def test_content_parts_are_flattened_to_text(family_dir):
    """OpenAI-style text parts become one string (joined by newlines), so templates that test `content is string`
    (Qwen3) see the text; transformers given the joined string renders the same."""
    text_parts = [{"type": "text", "text": "First line."}, {"type": "text", "text": "Second."}]
    parts = [{"role": "user", "content": text_parts}]
    joined = [{"role": "user", "content": "First line.\nSecond."}]
    folder = family_dir("qwen3")
    assert load_chat_template(folder).render(parts) == hf_render(folder, joined, add_generation_prompt=True)


# ---- the bundled model -------------------------------------------------------------------------------------


@pytest.mark.parametrize("chat", list(CHATS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_tiny_moe_template_renders_as_transformers(chat, add_generation_prompt):
    template = load_chat_template(TINY_MOE)
    assert template.origin == str(TINY_MOE / "chat_template.jinja")
    ours = template.render(CHATS[chat], add_generation_prompt=add_generation_prompt)
    assert ours == hf_render(TINY_MOE, CHATS[chat], add_generation_prompt=add_generation_prompt)


def test_tiny_moe_prompt_is_the_start_of_a_python_file():
    text = load_chat_template(TINY_MOE).render([{"role": "system", "content": "String helpers."},
                                                {"role": "user", "content": "Reverse a string.\nKeep it short."}])
    assert text == '<|endoftext|>"""String helpers."""\n\n# Reverse a string.\n# Keep it short.\n\n'


def test_tiny_moe_encoding_has_one_bos():
    """The template writes <|endoftext|> and tiny-moe's post-processor would prepend another: encode_chat adds none,
    giving transformers' apply_chat_template(tokenize=True) ids, which start with exactly one bos (id 0)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(TINY_MOE / "tokenizer.json"))
    text = load_chat_template(TINY_MOE).render(CHATS["one user turn"])
    ids = encode_chat(tokenizer, text)
    hf = transformers.AutoTokenizer.from_pretrained(str(TINY_MOE))
    assert ids == hf.apply_chat_template(CHATS["one user turn"], add_generation_prompt=True, return_dict=False)
    assert ids[0] == 0 and ids[1] != 0
    assert tokenizer.encode(text).ids[:2] == [0, 0]  # what a plain encode() would have given the model


def test_tiny_moe_refuses_an_unknown_role():
    with pytest.raises(ConfigError, match=r"chat_template\.jinja refused .*not tool") as e:
        load_chat_template(TINY_MOE).render([{"role": "tool", "content": "42"}])
    assert "\n" not in str(e.value)


# ---- where templates come from -----------------------------------------------------------------------------


def test_template_file_takes_precedence_over_tokenizer_config(tmp_path):
    folder = make_folder(tmp_path, dict(CONFIGS["llama3"], chat_template="CONFIG {{ messages[0].content }}"),
                         "FILE {{ messages[0].content }}")
    chat = CHATS["one user turn"]
    assert load_chat_template(folder).render(chat) == hf_render(folder, chat) == "FILE What is an expert cache?"


@pytest.mark.parametrize("layout", ["list", "dict"])
def test_named_templates_in_tokenizer_config(tmp_path, layout):
    """The hub stores several templates as a list of {"name", "template"}; the one named "default" is used."""
    default = (TEMPLATES / "mistral-instruct-v0.1.jinja").read_text()
    named = {"default": default, "tool_use": "TOOLS {{ tools | length }}"}
    value = [{"name": k, "template": v} for k, v in named.items()] if layout == "list" else named
    folder = make_folder(tmp_path, dict(CONFIGS["mixtral"], chat_template=value))
    chat = CHATS["ends with assistant"] + [{"role": "user", "content": "Another?"}]
    template = load_chat_template(folder)
    assert template.render(chat) == hf_render(folder, chat, add_generation_prompt=True)
    assert template.render(chat) == "<s>[INST] Name a prime. [/INST]7</s> [INST] Another? [/INST]"
    assert load_chat_template(folder, name="tool_use").render(chat, tools=TOOLS) == "TOOLS 1"


def test_additional_template_files_replace_the_config_template(tmp_path):
    """Template files win over tokenizer_config.json even when none is the default: then there is no default, and
    transformers refuses to pick; so do we, naming the templates there are."""
    folder = make_folder(tmp_path, dict(CONFIGS["llama3"], chat_template="CONFIG"))
    (folder / "additional_chat_templates").mkdir()
    (folder / "additional_chat_templates" / "rag.jinja").write_text("RAG {{ documents | length }}")
    with pytest.raises(ValueError, match="no default"):
        hf_render(folder, CHATS["one user turn"])
    with pytest.raises(ConfigError, match=r"\['rag'\] but none named 'default'"):
        load_chat_template(folder)
    assert load_chat_template(folder, name="rag").render(CHATS["one user turn"], documents=[{"text": "x"}]) == "RAG 1"


def test_no_template_gives_none_and_the_fallback(tmp_path):
    folder = make_folder(tmp_path, {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>"})
    assert load_chat_template(folder) is None
    template = resolve_chat_template(folder)
    assert template.is_fallback and template == fallback_chat_template(folder)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert template.render(chat) == "<s>system: Be brief.\nuser: Hi\nassistant:"
    assert template.render(chat, add_generation_prompt=False) == "<s>system: Be brief.\nuser: Hi\n"
    for add in (True, False):
        assert template.render(CHATS["multi-turn"], add_generation_prompt=add) == hf_render(
            folder, CHATS["multi-turn"], add_generation_prompt=add, chat_template=FALLBACK_TEMPLATE)


def test_fallback_without_bos(tmp_path):
    """No bos token in the config (Qwen's case), or no tokenizer_config.json at all: the transcript alone."""
    for config in (CONFIGS["qwen3"], None):
        folder = make_folder(tmp_path / str(config is None), config)
        assert resolve_chat_template(folder).render(CHATS["one user turn"]) == (
            "user: What is an expert cache?\nassistant:")


# ---- special tokens ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("config,legacy", [
    (CONFIGS["mixtral"], None),
    (CONFIGS["qwen3"], None),
    ({"bos_token": "<x>", "eos_token": "</s>"}, {"bos_token": {"content": "<s>", "lstrip": False}}),  # legacy wins
    ({"bos_token": "<x>", "added_tokens_decoder": {}}, {"bos_token": "<s>"}),  # ...unless the config is the new kind
    ({"eos_token": "</s>", "image_token": "<img>", "foo_token": {"content": "<foo>"},  # plain dict: not a token
      "extra_special_tokens": {"audio_token": "<aud>"}}, None),
], ids=["added-token dicts", "nulls", "legacy map", "legacy map ignored", "model-specific"])
def test_special_tokens_are_those_transformers_passes(tmp_path, config, legacy):
    folder = make_folder(tmp_path, dict(config, tokenizer_class="PreTrainedTokenizerFast"))
    if legacy is not None:
        (folder / "special_tokens_map.json").write_text(json.dumps(legacy))
    expected = transformers.AutoTokenizer.from_pretrained(str(folder)).special_tokens_map
    assert read_special_tokens(folder) == expected


def test_extras_override_special_tokens(family_dir):
    folder = family_dir("mixtral")
    ours = load_chat_template(folder).render(CHATS["one user turn"], bos_token="<BOS>")
    assert ours == hf_render(folder, CHATS["one user turn"], bos_token="<BOS>")
    assert ours.startswith("<BOS> [INST]")


def test_bad_special_token_names_the_field(tmp_path):
    folder = make_folder(tmp_path, {"bos_token": 5}, "x")
    with pytest.raises(CheckpointError, match=r"tokenizer_config\.json: bos_token must be a string"):
        load_chat_template(folder)


# ---- the environment ---------------------------------------------------------------------------------------


def test_environment_features_match_transformers(tmp_path):
    """loop controls, {% generation %} (rendered as its body), dict(), namespace(), tojson options, trim/lstrip."""
    source = ("{% set ns = namespace(n=0) %}\n"
              "  {% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}"
              "{% if m.role == 'system' %}{% continue %}{% endif %}{% set ns.n = ns.n + 1 %}"
              "{% generation %}[{{ m.content }}]{% endgeneration %}{% endfor %}\n"
              "{{ ns.n }} {{ dict(a=1, b=[2]) | tojson(indent=1, sort_keys=True) }} {{ dict.fromkeys('xy') | tojson }}"
              " {{ tools }} {{ documents }}")  # both passed, as None, when not given
    folder = make_folder(tmp_path, CONFIGS["llama3"], source)
    chat = CHATS["multi-turn"]
    ours = load_chat_template(folder).render(chat)
    assert ours == hf_render(folder, chat, add_generation_prompt=True)
    assert ours.startswith("[2+2?]1 {\n") and ours.endswith(" None None")


def test_namespace_refuses_underscore_names(tmp_path):
    folder = make_folder(tmp_path, CONFIGS["llama3"], "{% set ns = namespace() %}{% set ns._x = 1 %}")
    with pytest.raises(ConfigError, match="SecurityError"):
        load_chat_template(folder).render(CHATS["one user turn"])


def test_sandbox_blocks_python_internals(tmp_path):
    folder = make_folder(tmp_path, CONFIGS["llama3"], "{{ messages.__class__.__mro__ }}{{ ''.__class__ }}")
    with pytest.raises(ConfigError, match="failed on this conversation"):
        load_chat_template(folder).render(CHATS["one user turn"])


# ---- errors ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("messages,field", [
    ("hello", r"^messages must be a list"),
    ([], r"^messages is empty"),
    ([{"role": "user", "content": "a"}, "b"], r"^messages\[1\] must be a dict"),
    ([{"content": "a"}], r"^messages\[0\]\.role must be a non-empty string"),
    ([{"role": "", "content": "a"}], r"^messages\[0\]\.role"),
    ([{"role": 3, "content": "a"}], r"^messages\[0\]\.role .*got 3"),
    ([{"role": "user", "content": "a"}, {"role": "user"}], r"^messages\[1\]\.content is missing"),
    ([{"role": "user", "content": None}], r"^messages\[0\]\.content must be a string or a list of text parts"),
    ([{"role": "user", "content": 5}], r"^messages\[0\]\.content must be"),
    ([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {}}]}],
     r"^messages\[0\]\.content\[1\]\.type is 'image_url': only text"),
    ([{"role": "user", "content": [{"type": "text", "text": 1}]}], r"^messages\[0\]\.content\[0\]\.text must be"),
    ([{"role": "user", "content": ["a"]}], r"^messages\[0\]\.content\[0\] must be a dict"),
])
def test_bad_messages_name_the_field(messages, field):
    with pytest.raises(ConfigError, match=field) as e:
        load_chat_template(TINY_MOE).render(messages)
    assert "\n" not in str(e.value) and e.value.hint


def test_validate_messages_leaves_the_input_alone():
    chat = [{"role": "user", "content": [{"type": "text", "text": "a"}], "name": None}]
    assert validate_messages(chat) == [{"role": "user", "content": "a"}]
    assert chat == [{"role": "user", "content": [{"type": "text", "text": "a"}], "name": None}]


def test_raise_exception_names_the_template_file(family_dir):
    folder = family_dir("mixtral")
    chat = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(transformers.utils.chat_template_utils.jinja2.TemplateError, match="alternate"):
        hf_render(folder, chat)
    with pytest.raises(ConfigError, match=r"mixtral.*chat_template\.jinja refused the conversation: .*must alternate"):
        load_chat_template(folder).render(chat)


def test_syntax_error_names_the_file_and_line(tmp_path):
    folder = make_folder(tmp_path, CONFIGS["llama3"], "{{ bos_token }}\n{% if messages %}\nno endif")
    with pytest.raises(ConfigError, match=r"chat_template\.jinja does not parse: line \d+: ") as e:
        load_chat_template(folder)
    assert "\n" not in str(e.value)


def test_template_runtime_error_names_the_template(tmp_path):
    folder = make_folder(tmp_path, dict(CONFIGS["llama3"], chat_template="{{ messages[0].content + 1 }}"))
    with pytest.raises(ConfigError, match=r"tokenizer_config\.json \(chat_template\) failed .*TypeError"):
        load_chat_template(folder).render(CHATS["one user turn"])


def test_malformed_chat_template_field(tmp_path):
    folder = make_folder(tmp_path, {"chat_template": [{"name": "default"}]})
    with pytest.raises(ConfigError, match=r"tokenizer_config\.json: chat_template\[0\] must be"):
        load_chat_template(folder)
    folder = make_folder(tmp_path / "b", {"chat_template": 3})
    with pytest.raises(ConfigError, match=r"chat_template must be a string"):
        load_chat_template(folder)


def test_chat_template_is_frozen_and_compares_by_content():
    a = ChatTemplate("{{ 1 }}", "here", {"bos_token": "<s>"})
    assert a == ChatTemplate("{{ 1 }}", "here", {"bos_token": "<s>"}) and a.bos_token == "<s>"
    with pytest.raises(AttributeError):
        a.source = "x"
    with pytest.raises(TypeError):
        a.special_tokens["bos_token"] = "<x>"
