"""Where a checkpoint is (a bundled model's name, a folder, a GGUF file, or a hub repo id through huggingface_hub's
cache) and its JSON files: config.json (or a multimodal wrapper's text_config), generation_config.json.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from offload.checkpoint.families import family_for_config
from offload.errors import CheckpointError, UnsupportedModelError

BUNDLED_DIR = Path(__file__).parents[1] / "bundled"


def bundled_models() -> list[str]:
    """Names of the models shipped inside the package."""
    if not BUNDLED_DIR.is_dir():
        return []
    return sorted(p.name for p in BUNDLED_DIR.iterdir() if (p / "config.json").is_file())


def _looks_like_repo_id(name: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name) is not None


def resolve_model_dir(name_or_path: str | os.PathLike, weights: bool = True) -> Path:
    """A bundled model name, a local directory, a .gguf file (a folder holding one GGUF model resolves to it, a
    split set to its first part), or a hub repo id (through huggingface_hub's cache; with ``weights=False`` only its
    JSON files are fetched, as `offload info` needs)."""
    text = str(name_or_path)
    if text in bundled_models():
        return BUNDLED_DIR / text
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            return _checkpoint_file(path)
        return _gguf_in_folder(path) or path
    if _looks_like_repo_id(text) and not path.parent.exists():
        return _download(text, weights)
    hint = "give a checkpoint directory, a hub repo id (org/name)"
    if bundled_models():
        hint += f" or a bundled model ({', '.join(bundled_models())})"
    raise CheckpointError(f"no such model directory: {path}", hint)


def _checkpoint_file(path: Path) -> Path:
    """A file given as the checkpoint: a .gguf file, or the first part of a split GGUF set."""
    if path.suffix.lower() != ".gguf":
        raise CheckpointError(f"{path} is a file, not a checkpoint directory",
                              "pass the folder that holds config.json and *.safetensors, or a .gguf file")
    m = re.match(r"^(.+)-(\d{5})-of-(\d{5})\.gguf$", path.name)
    return path if m is None else path.with_name(f"{m[1]}-00001-of-{m[3]}.gguf")


def _gguf_in_folder(folder: Path) -> Path | None:
    """The GGUF model a folder without config.json holds (llama.cpp's projector files, mmproj*, are not models)."""
    if (folder / "config.json").is_file():
        return None
    models = sorted({_checkpoint_file(p) for p in folder.glob("*.gguf") if not p.name.lower().startswith("mmproj")})
    if len(models) > 1:
        raise CheckpointError(f"{folder} holds {len(models)} GGUF models ({', '.join(p.name for p in models)})",
                              "pass the .gguf file to use")
    return models[0] if models else None


def _download(repo_id: str, weights: bool = True) -> Path:
    from huggingface_hub import snapshot_download  # imported lazily: only needed for hub ids

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.jinja", "additional_chat_templates/*"] if weights else \
        ["config.json", "generation_config.json"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as online_error:  # noqa: BLE001 - any hub failure ends in the same user-facing error
        try:
            return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
        except Exception:  # noqa: BLE001
            raise CheckpointError(
                f"cannot fetch {repo_id!r} from the Hugging Face hub and it is not in the local cache "
                f"({type(online_error).__name__})",
                "check the repo id and your network, or download it once with `hf download REPO`",
            ) from None


def model_name(model_dir: Path) -> str:
    """A checkpoint's name as users know it: the repo id of a huggingface_hub cache snapshot
    (.../models--org--name/snapshots/COMMIT), else the folder's name (a bundled model's is its name)."""
    parent = model_dir.parent
    if parent.name == "snapshots" and parent.parent.name.startswith("models--"):
        return parent.parent.name.removeprefix("models--").replace("--", "/", 1)
    return model_dir.name


def read_config(model_dir: Path) -> dict:
    """config.json as a dict; a clear error when it is missing or not JSON."""
    path = model_dir / "config.json"
    if not path.is_file():
        raise CheckpointError(f"no config.json in {model_dir}", "a Hugging Face checkpoint folder needs config.json")
    return _read_json(path)


def read_json_if_present(path: Path) -> dict:
    return _read_json(path) if path.is_file() else {}


def _read_json(path: Path) -> dict:
    """A JSON object from a file, or an error naming the file and where it breaks (never echoing its bytes)."""
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path} is not UTF-8 text (byte {e.start})", "re-download the checkpoint") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON (line {e.lineno} column {e.colno}: {e.msg})",
                              "re-download the checkpoint") from None
    except RecursionError:
        raise CheckpointError(f"{path} is not valid JSON (nested too deeply)", "re-download the checkpoint") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} holds no JSON object", "re-download the checkpoint")
    return value


def language_config(cfg: dict) -> dict:
    """The language model's config: the top level, or a multimodal wrapper's ``text_config`` (Kimi-K2.6)."""
    text = cfg.get("text_config")
    if not isinstance(text, dict) or not (text.get("architectures") or text.get("model_type")):
        return cfg
    try:
        family_for_config(cfg)
        return cfg
    except UnsupportedModelError:
        qc = quantization_config(cfg)  # the wrapper's architecture names the checkpoint where the text has none
        return {**text, "architectures": text.get("architectures") or cfg.get("architectures"),
                **({"quantization_config": qc} if qc else {})}


def quantization_config(cfg: dict) -> dict | None:
    """config.json's quantization_config, at the top level or nested in text_config (Kimi-K2.6)."""
    qc = cfg.get("quantization_config") or (cfg.get("text_config") or {}).get("quantization_config")
    return qc if isinstance(qc, dict) else None
