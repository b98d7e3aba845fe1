"""Chat templates: a conversation -> the prompt text a checkpoint expects, byte for byte as transformers renders it.

An instruct model was fine-tuned on text laid out by its chat template, a jinja program shipped with the
checkpoint; a prompt that differs by one space or one special token is a prompt it has not seen. The runtime
does not depend on transformers, so this module reproduces the parts of ``apply_chat_template(messages,
tokenize=False)`` that decide the text, and tests/offload/test_chat.py checks the equality against transformers:

- where the template comes from (:func:`load_chat_template`) and which special tokens it sees
  (:func:`read_special_tokens`);
- the jinja environment: sandboxed and immutable (hub templates are untrusted code), ``trim_blocks`` and
  ``lstrip_blocks``, the loop-controls extension, ``{% generation %}`` (kept, its body rendered), the globals
  ``raise_exception``, ``strftime_now``, ``dict`` and ``namespace``, and a ``tojson`` that does not HTML-escape;
- the variables: ``messages``, ``tools`` and ``documents`` (None unless given), ``add_generation_prompt``, the
  named special tokens (``bos_token``, ``eos_token``, ...), then the caller's extras, which win.

Special tokens belong to the template: Mixtral's and tiny-moe's start with ``{{ bos_token }}``. So the rendered
text is encoded without the tokenizer's own special tokens (:func:`encode_chat`), as ``apply_chat_template(...,
tokenize=True)`` does; tiny-moe's tokenizer.json post-processor prepends ``<|endoftext|>`` to every plain
``encode()``, which would give the model two.

Not reproduced: ``continue_final_message``, assistant-token masks, ``sanitize_control_tokens``, tools given as
Python functions (pass their JSON schemas), a tokenizer class's built-in default tokens (transformers'
LlamaTokenizer assumes ``<s>`` when tokenizer_config.json names no bos_token; here it is then unset), and the
processors' chat_template.json.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import cache
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from offload.checkpoint.gguf_vocab import gguf_special_tokens
from offload.checkpoint.locate import read_json_if_present
from offload.errors import CheckpointError, ConfigError

TEMPLATE_FILE = "chat_template.jinja"
EXTRA_TEMPLATES_DIR = "additional_chat_templates"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
# transformers' SPECIAL_TOKENS_ATTRIBUTES: the tokens every tokenizer may name, passed to every template
NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Older names for a message's reasoning; transformers copies the first one set to reasoning_content and thinking
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")

FALLBACK_ORIGIN = "offload.serve.chat.FALLBACK_TEMPLATE"
FALLBACK_TEMPLATE = (
    "{%- if bos_token %}{{ bos_token }}{% endif %}"
    "{%- for message in messages %}{{ message.role + ': ' + message.content + '\\n' }}{% endfor %}"
    "{%- if add_generation_prompt %}{{ 'assistant:' }}{% endif %}"
)
"""For checkpoints without a template: the bos token if the tokenizer config names one, then one line
``<role>: <content>`` per message (content verbatim, newlines and all, then ``\\n``), then ``assistant:``
(no space or newline after it) when a generation prompt is asked for. For example
``<s>system: Be brief.\\nuser: Hi\\nassistant:``. A plain transcript is the one layout a base model has
seen in its pre-training text, so it is the least surprising prompt when no template says otherwise."""

_MESSAGE_HINT = "each message is {'role': 'user', 'content': 'text'}"


@dataclass(frozen=True)
class ChatTemplate:
    """One chat template, where it came from, and the special tokens it sees; :meth:`render` makes the prompt.

    The template is compiled when the object is made, so a template that does not parse fails at load time
    with the file named, not at the first request.
    """

    source: str  # the jinja text
    origin: str  # where ``source`` came from, named in errors: a file, a tokenizer_config.json entry, or the fallback
    special_tokens: Mapping[str, str] = field(default_factory=dict, hash=False)
    _compiled: jinja2.Template = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        # a read-only view of a copy: frozen means the tokens a template sees cannot change under it either
        object.__setattr__(self, "special_tokens", MappingProxyType(dict(self.special_tokens)))
        object.__setattr__(self, "_compiled", _compile(self.source, self.origin))

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens.get("bos_token")

    @property
    def is_fallback(self) -> bool:
        return self.origin == FALLBACK_ORIGIN

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, **extra: Any) -> str:
        """The prompt text for ``messages``: the string transformers' ``apply_chat_template(messages,
        tokenize=False, add_generation_prompt=...)`` returns for the same files.

        ``extra`` become template variables (``tools=[...]``, ``documents=[...]``, ``enable_thinking=False``,
        ``date_string=...``) and override the special tokens of the same name. Encode the result with
        :func:`encode_chat`: the template already wrote the special tokens it wants.
        """
        chat = validate_messages(messages)
        variables = {"tools": None, "documents": None, **self.special_tokens, **extra}
        try:
            return self._compiled.render(messages=chat, add_generation_prompt=add_generation_prompt, **variables)
        except _TemplateRaised as e:
            raise ConfigError(f"the chat template {self.origin} refused the conversation: {_one_line(e.message)}",
                              "change the messages to a form this model's template accepts") from None
        except (jinja2.TemplateError, TypeError, ValueError) as e:
            # a template is a program: a bad operation on these messages is its error, reported like raise_exception
            raise ConfigError(f"the chat template {self.origin} failed on this conversation "
                              f"({type(e).__name__}: {_one_line(str(e))})",
                              "check the messages' roles and fields, or fix the template") from None


def load_chat_template(model_dir: Path, name: str = "default") -> ChatTemplate | None:
    """The checkpoint's chat template, found where transformers finds it; None when the checkpoint has none.

    Precedence, as ``AutoTokenizer.from_pretrained`` and ``get_chat_template`` resolve it:

    1. template files: ``chat_template.jinja`` (the template named "default") and
       ``additional_chat_templates/<name>.jinja``. When any of them exists they replace tokenizer_config.json's
       ``chat_template`` entirely, even if none of them is the default.
    2. tokenizer_config.json's ``chat_template``: a string (the default), a list of ``{"name", "template"}``
       (the hub's layout for several templates) or a dict from name to template.

    ``name`` picks one of several named templates; asking for a name the checkpoint lacks (e.g. "default" when
    it only has "tool_use" and "rag") is an error, as it is in transformers.
    """
    model_dir = Path(model_dir)
    templates, where = _template_files(model_dir)
    if not templates:
        templates, where = _config_templates(model_dir)
    if not templates:
        return None
    if name not in templates:
        raise ConfigError(f"{where} has chat templates {sorted(templates)} but none named {name!r}",
                          f"pick one of {sorted(templates)} by name")
    source, origin = templates[name]
    return ChatTemplate(source, origin, read_special_tokens(model_dir))


def fallback_chat_template(model_dir: Path) -> ChatTemplate:
    """:data:`FALLBACK_TEMPLATE` with the checkpoint's special tokens (for its bos token)."""
    return ChatTemplate(FALLBACK_TEMPLATE, FALLBACK_ORIGIN, read_special_tokens(Path(model_dir)))


def resolve_chat_template(model_dir: Path, metadata: Mapping[str, Any] | None = None) -> ChatTemplate:
    """The checkpoint's default template: its files (see :func:`load_chat_template`), else the one a GGUF file embeds
    in its ``metadata`` (``tokenizer.chat_template``), else the fallback (see ``is_fallback``)."""
    return load_chat_template(model_dir) or gguf_chat_template(model_dir, metadata or {}) or \
        fallback_chat_template(model_dir)


def gguf_chat_template(path: Path, metadata: Mapping[str, Any]) -> ChatTemplate | None:
    """``tokenizer.chat_template`` of a GGUF file, with the special tokens its metadata names."""
    source = metadata.get("tokenizer.chat_template")
    if not isinstance(source, str):
        return None
    return ChatTemplate(source, f"{path} (tokenizer.chat_template)", gguf_special_tokens(metadata))


def encode_chat(tokenizer: Any, text: str) -> list[int]:
    """Token ids of rendered chat text with a ``tokenizers.Tokenizer``: the template wrote every special token it
    wants, so the tokenizer's post-processor adds none (``add_special_tokens=False``, as transformers does).

    Special tokens written as text in the template (``<|im_start|>``, the bos token) are still matched as single
    tokens, because tokenizers matches added tokens before splitting the rest.
    """
    return tokenizer.encode(text, add_special_tokens=False).ids


def read_special_tokens(model_dir: Path) -> dict[str, str]:
    """The special tokens a template sees as variables, read from the tokenizer files as transformers reads them.

    tokenizer_config.json's ``bos_token``, ``eos_token``, ``unk_token``, ``sep_token``, ``pad_token``,
    ``cls_token`` and ``mask_token``, each a string or an AddedToken dict (its ``content``); null leaves one
    unset. The legacy special_tokens_map.json overrides them only when tokenizer_config.json has no
    ``added_tokens_decoder`` (transformers' rule: only the older layout, which lacks it, kept tokens there).
    Model-specific tokens (any other ``*_token`` key, like ``image_token``, and the ``extra_special_tokens``
    dict) are passed too; for one named in both files, tokenizer_config.json wins.
    """
    config_path = Path(model_dir) / TOKENIZER_CONFIG
    config = read_json_if_present(config_path)
    legacy = {} if "added_tokens_decoder" in config else read_json_if_present(Path(model_dir) / SPECIAL_TOKENS_MAP)
    tokens: dict[str, str | None] = {}
    for source, path in ((config, config_path), (legacy, Path(model_dir) / SPECIAL_TOKENS_MAP)):
        for key in NAMED_SPECIAL_TOKENS:
            if key in source:  # a later file's null unsets the token
                tokens[key] = _named_token(source[key], key, path)
    extras = {**_model_specific_tokens(legacy, plain_dicts=True), **_model_specific_tokens(config, plain_dicts=False)}
    return {**extras, **{k: v for k, v in tokens.items() if v is not None}}


def validate_messages(messages: object) -> list[dict[str, Any]]:
    """Check ``messages`` is a non-empty list of ``{"role": str, "content": str | text parts}`` and return copies
    ready for a template.

    Content given as OpenAI-style parts (``[{"type": "text", "text": ...}, ...]``) becomes their texts joined by
    newlines, as vLLM's chat server joins them, so every template sees a string. Other keys (``tool_calls``,
    ``name``, ``reasoning_content``, ...) pass through; as in transformers, keys whose value is None are dropped and
    an older reasoning field is copied to ``reasoning_content`` and ``thinking``.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ConfigError(f"messages must be a list of message dicts, got {_short(messages)}", _MESSAGE_HINT)
    if not messages:
        raise ConfigError("messages is empty", "give at least one message")
    return [_checked_message(m, f"messages[{i}]") for i, m in enumerate(messages)]


def _checked_message(message: object, where: str) -> dict[str, Any]:
    if not isinstance(message, Mapping):
        raise ConfigError(f"{where} must be a dict with 'role' and 'content', got {_short(message)}", _MESSAGE_HINT)
    role = message.get("role")
    if not isinstance(role, str) or not role:
        raise ConfigError(f"{where}.role must be a non-empty string, got {_short(role)}", _MESSAGE_HINT)
    if "content" not in message:
        raise ConfigError(f"{where}.content is missing", _MESSAGE_HINT)
    out = {key: value for key, value in message.items() if value is not None}
    out["content"] = _content_text(message["content"], f"{where}.content")
    reasoning = next((out[key] for key in REASONING_FIELDS if key in out), None)
    if reasoning is not None:
        out = {"thinking": reasoning, **out, "reasoning_content": reasoning}
    return out


def _content_text(content: object, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, bytes) or not isinstance(content, Sequence):
        raise ConfigError(f"{where} must be a string or a list of text parts, got {_short(content)}", _MESSAGE_HINT)
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, Mapping):
            raise ConfigError(f"{where}[{j}] must be a dict {{'type': 'text', 'text': ...}}, got {_short(part)}",
                              _MESSAGE_HINT)
        if part.get("type") != "text":
            raise ConfigError(f"{where}[{j}].type is {_short(part.get('type'))}: only text parts are supported",
                              "the runtime serves text models: send the text alone")
        if not isinstance(part.get("text"), str):
            raise ConfigError(f"{where}[{j}].text must be a string, got {_short(part.get('text'))}", _MESSAGE_HINT)
        texts.append(part["text"])
    return "\n".join(texts)


def _named_token(value: object, key: str, path: Path) -> str | None:
    if value is None or isinstance(value, str):
        return value
    # transformers needs "__type": "AddedToken" here and fails to load without it; any dict with content is accepted
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise CheckpointError(f"{path}: {key} must be a string or a dict with 'content', got {_short(value)}",
                          "fix the tokenizer config or re-download the checkpoint")


def _model_specific_tokens(source: Mapping[str, Any], plain_dicts: bool) -> dict[str, str]:
    """Other ``*_token`` keys and the ``extra_special_tokens`` dict; a dict value counts when it is an AddedToken
    (transformers converts plain dicts only in special_tokens_map.json: ``plain_dicts``)."""
    extra = source.get("extra_special_tokens")
    items = [*source.items(), *(extra.items() if isinstance(extra, Mapping) else ())]
    out = {}
    for key, value in items:
        if not key.endswith("_token") or key in NAMED_SPECIAL_TOKENS:
            continue
        if isinstance(value, str):
            out[key] = value
        elif (isinstance(value, Mapping) and isinstance(value.get("content"), str)
              and (plain_dicts or value.get("__type") == "AddedToken")):
            out[key] = value["content"]
    return out


def _template_files(model_dir: Path) -> tuple[dict[str, tuple[str, str]], str]:
    """chat_template.jinja as "default", then additional_chat_templates/*.jinja by name (a "default.jinja" there wins,
    as the later read does in transformers)."""
    files = {}
    if (model_dir / TEMPLATE_FILE).is_file():
        files["default"] = model_dir / TEMPLATE_FILE
    if (model_dir / EXTRA_TEMPLATES_DIR).is_dir():
        for path in sorted((model_dir / EXTRA_TEMPLATES_DIR).glob("*.jinja")):
            files[path.name.removesuffix(".jinja")] = path
    return {name: (_read_template(path), str(path)) for name, path in files.items()}, str(model_dir)


def _read_template(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})", "re-download it") from None


def _config_templates(model_dir: Path) -> tuple[dict[str, tuple[str, str]], str]:
    """tokenizer_config.json's chat_template: a string, a list of {"name", "template"} or a dict name -> template."""
    path = model_dir / TOKENIZER_CONFIG
    value = read_json_if_present(path).get("chat_template")
    if value is None:
        return {}, str(path)
    if isinstance(value, str):
        return {"default": (value, f"{path} (chat_template)")}, str(path)
    if isinstance(value, list):
        for i, item in enumerate(value):
            if not (isinstance(item, Mapping) and isinstance(item.get("name"), str)
                    and isinstance(item.get("template"), str)):
                raise ConfigError(f"{path}: chat_template[{i}] must be {{'name': str, 'template': str}}, "
                                  f"got {_short(item)}", "fix the tokenizer config or re-download the checkpoint")
        value = {item["name"]: item["template"] for item in value}
    if not isinstance(value, Mapping) or not all(isinstance(t, str) for t in value.values()):
        raise ConfigError(f"{path}: chat_template must be a string, a list of {{'name', 'template'}} or a dict of "
                          f"strings, got {_short(value)}", "fix the tokenizer config or re-download the checkpoint")
    return {name: (text, f"{path} (chat_template {name!r})") for name, text in value.items()}, str(path)


def _compile(source: str, origin: str) -> jinja2.Template:
    try:
        return _environment().from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ConfigError(f"the chat template {origin} does not parse: line {e.lineno}: {_one_line(e.message or '')}",
                          "fix the template, or remove it to use the plain fallback") from None


class _TemplateRaised(jinja2.TemplateError):
    """What a template's raise_exception(...) raises: the template's own refusal of the conversation."""


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` marks assistant text for transformers' training masks; a prompt
    needs only the text, so the body is rendered as it is."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.CallBlock:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """``namespace()`` refusing underscore-prefixed names, as transformers' does: they reach CPython internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # jinja's own signature trick, so namespace(self=...) works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)


def _check_name(name: object) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(f"chat templates cannot store {name!r} on a namespace")


class _Dict:
    """``dict(...)`` and ``dict.fromkeys(...)`` for templates without handing them the ``dict`` type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: tuple | None = None,
            sort_keys: bool = False) -> str:
    # jinja's own tojson escapes <, >, & and ' for HTML; templates were written against this plain one
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


@cache
def _environment() -> ImmutableSandboxedEnvironment:
    """transformers' chat-template environment (utils/chat_template_utils.py), built once."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_Dict(),
                       namespace=_Namespace)
    return env


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
