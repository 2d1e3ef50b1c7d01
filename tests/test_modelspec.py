"""fedsweep.modelspec: the shapes of models (parameter counts from config.json alone, checked
against the models transformers builds) and the tiny families' configs."""

from __future__ import annotations

import json

import pytest

from fedsweep import modelspec


# ----------------------------------------------------------------------------- model shapes


@pytest.mark.parametrize("family", modelspec.TINY_FAMILIES)
def test_parameter_count_of_the_tiny_models_is_exact(family):
    from fedsweep.models import build_model, num_parameters

    model = build_model(family, num_labels=4, seed=0)
    assert modelspec.parameters_of(modelspec.TINY_CONFIGS[family], num_labels=4) == num_parameters(model)
    assert modelspec.model_shape(family).source == "tiny"


@pytest.mark.parametrize("name", ["bert-base-cased", "albert-base-v1", "distilbert-base-cased", "roberta-base"])
def test_parameter_count_of_the_known_hub_models_is_exact(name):
    """The table's configs, built on the meta device: the formula counts every parameter."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    known = dict(modelspec.KNOWN_CONFIGS[name])
    config = AutoConfig.for_model(known.pop("model_type"), num_labels=2, **known)
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
    assert modelspec.parameters_of(modelspec.KNOWN_CONFIGS[name]) == sum(p.numel() for p in model.parameters())


def test_model_shape_sources(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache: hub models come from the table
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    minilm = modelspec.model_shape("minilm")
    assert minilm.source == "config.json" and (minilm.layers, minilm.hidden) == (6, 384)
    assert abs(minilm.params - 22_714_756) < 1000  # run.json's count for the demo's 4 classes
    bert = modelspec.model_shape("bert-base-cased")
    assert bert.source == "known" and bert.params == 108_310_272 + 768 * 2 + 2
    assert modelspec.model_shape("google-bert/bert-base-cased").source == "known"
    assert modelspec.model_shape("distilbert").layers == 6  # the paper's alias
    assert modelspec.model_shape("someone/unknown-model").source == "assumed"
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**modelspec.KNOWN_CONFIGS["bert-base-cased"],
                                                    "num_hidden_layers": 4}))
    local = modelspec.model_shape(str(folder))
    assert local.source == "config.json" and local.layers == 4 and local.params < bert.params


# Hub decoders' configs (fewer layers than the real ones: the count per layer is what is checked).
DECODERS = {
    "qwen2.5-0.5b": {"model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896, "num_hidden_layers": 2,
                     "num_attention_heads": 14, "num_key_value_heads": 2, "intermediate_size": 4864,
                     "max_position_embeddings": 32768, "tie_word_embeddings": True},
    "llama-with-biases": {"model_type": "llama", "vocab_size": 32000, "hidden_size": 256, "num_hidden_layers": 3,
                          "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 688,
                          "attention_bias": True, "mlp_bias": True},
    "mistral": {"model_type": "mistral", "vocab_size": 32000, "hidden_size": 256, "num_hidden_layers": 2,
                "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 64, "intermediate_size": 512},
    "gpt2": {"model_type": "gpt2", "vocab_size": 50257, "n_embd": 768, "n_layer": 2, "n_head": 12,
             "n_positions": 1024},
}


@pytest.mark.parametrize("name", DECODERS)
def test_parameter_count_of_hub_decoders_is_exact(name):
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    values = dict(DECODERS[name])
    config = AutoConfig.for_model(values.pop("model_type"), num_labels=3, **values)
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
    assert modelspec.parameters_of(DECODERS[name], num_labels=3) == sum(p.numel() for p in model.parameters())


def test_decoder_config_json_gives_its_shape(tmp_path):
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(DECODERS["gpt2"]))
    shape = modelspec.model_shape(str(folder))
    assert (shape.source, shape.layers, shape.hidden, shape.heads, shape.intermediate) == (
        "config.json", 2, 768, 12, 3072)
    assert modelspec.max_positions(str(folder)) == 1024


# The tiny families as fedsweep.models built them before their configs moved to modelspec's table.
def _former_tiny_config(family: str, num_labels: int):
    from transformers import AlbertConfig, BertConfig, DistilBertConfig, GPT2Config, LlamaConfig, Qwen2Config

    common = {"vocab_size": 30522, "num_labels": num_labels, "initializer_range": 0.1}
    encoder = {**common, "max_position_embeddings": 512}
    decoder = {**common, "pad_token_id": 0, "bos_token_id": 101, "eos_token_id": 102}
    return {
        "tiny-bert": lambda: BertConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=512, **encoder),
        "tiny-albert": lambda: AlbertConfig(embedding_size=64, hidden_size=128, num_hidden_layers=2,
                                            num_attention_heads=2, intermediate_size=512, **encoder),
        "tiny-distilbert": lambda: DistilBertConfig(dim=128, n_layers=2, n_heads=2, hidden_dim=512, **encoder),
        "tiny-llama": lambda: LlamaConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                                          num_key_value_heads=2, intermediate_size=512, max_position_embeddings=512,
                                          **decoder),
        "tiny-qwen2": lambda: Qwen2Config(hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                                          num_key_value_heads=1, intermediate_size=512, max_position_embeddings=512,
                                          **decoder),
        "tiny-gpt2": lambda: GPT2Config(n_embd=128, n_layer=2, n_head=2, n_inner=512, n_positions=512, **decoder),
    }[family]()


@pytest.mark.parametrize("family", modelspec.TINY_FAMILIES)
def test_tiny_configs_build_the_models_of_before(family):
    """Same config values, so the same random initialisation for a seed: runs of the tiny models
    stay comparable with earlier ones."""
    from fedsweep.models import build_model, tiny_config, total_parameters

    assert tiny_config(family, 4).to_dict() == _former_tiny_config(family, 4).to_dict()
    assert total_parameters(build_model(family, num_labels=2, seed=0)) == modelspec.model_shape(family).params
    assert modelspec.max_positions(family) == 512


_SMALL_HUB_CONFIGS = {  # architectures the tiny models do not cover, at a test's size
    "roberta": {"hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64},
    "mistral": {"hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                "intermediate_size": 64},
}


@pytest.mark.parametrize("model_type", sorted(modelspec.ADAPTABLE_MODULES))
def test_adaptable_modules_are_those_of_the_built_model(model_type):
    """The head node's table of LoRA targets (checked before any job) names exactly the Linear,
    Conv1D and Embedding modules transformers builds for each architecture."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification
    from transformers.pytorch_utils import Conv1D

    tiny = [dict(c) for c in modelspec.TINY_CONFIGS.values() if c["model_type"] == model_type]
    values = tiny[0] if tiny else {"model_type": model_type, **_SMALL_HUB_CONFIGS[model_type]}
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    config.num_labels, config.pad_token_id = 2, config.pad_token_id or 0
    model = AutoModelForSequenceClassification.from_config(config)
    built = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
             if isinstance(module, (torch.nn.Linear, Conv1D, torch.nn.Embedding))}
    assert set(modelspec.ADAPTABLE_MODULES[model_type]) == built


def test_missing_lora_targets_match_by_name_or_dotted_tail():
    assert modelspec.missing_lora_targets("tiny-llama", ["q_proj", "self_attn.v_proj"]) is None
    missing, model_type, _ = modelspec.missing_lora_targets("tiny-bert", ["query", "q_proj"])
    assert (missing, model_type) == (["q_proj"], "bert")
    assert modelspec.missing_lora_targets("no/such-model-here", ["anything"]) is None  # unknown: the job decides
