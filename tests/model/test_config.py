"""MEAConfig: defaults, validation errors that name the field, JSON round trip."""

import pytest
from helpers import TINY_DIMS, tiny_mea_config
from huggingface_hub.errors import StrictDataclassClassValidationError, StrictDataclassFieldValidationError

from mea_hf import MEAConfig


def test_defaults_mean_no_compression():
    config = tiny_mea_config()
    assert config.model_type == "mea"
    assert config.num_component_heads == config.num_key_value_heads == 2
    assert config.component_heads_per_layer == [2, 2]
    assert config.head_dim == TINY_DIMS["hidden_size"] // TINY_DIMS["num_attention_heads"]
    assert (config.hlc_keys, config.hlc_values, config.head_norm, config.qk_norm) == (True, True, "rms", False)
    assert config.kv_decode == "auto"
    assert config.o_proj_bias is False
    assert tiny_mea_config(attention_bias=True).o_proj_bias is True
    assert tiny_mea_config(attention_bias=True, o_proj_bias=False).o_proj_bias is False
    assert MEAConfig(**{**TINY_DIMS, "num_key_value_heads": None}).num_key_value_heads == 4


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"num_key_value_heads": 3}, "num_attention_heads"),  # 4 query heads are not a multiple of 3 KV heads
        ({"num_attention_heads": 0}, "num_attention_heads"),
        ({"hidden_size": 0}, "hidden_size"),
        ({"hidden_size": 66}, "hidden_size"),  # not a multiple of 4 heads and no head_dim given
        ({"num_key_value_heads": 0}, "num_key_value_heads"),
        ({"num_hidden_layers": 0}, "num_hidden_layers"),
        ({"head_dim": 0}, "head_dim"),
        ({"num_component_heads": 3}, "num_component_heads"),  # more components than KV heads
        ({"num_component_heads": 0}, "num_component_heads"),
        ({"num_component_heads": [2, 3]}, "num_component_heads"),  # one bad layer
        ({"num_component_heads": [2]}, "num_component_heads"),  # wrong length
        ({"num_component_heads": [2, 2, 1]}, "num_component_heads"),
        ({"num_component_heads": 1, "hlc_keys": False}, "hlc_keys"),
        ({"num_component_heads": [2, 1], "hlc_values": False}, "hlc_values"),
        ({"head_norm": "layer"}, "head_norm"),
        ({"head_norm": "group"}, "head_norm"),
        ({"kv_decode": "fast"}, "kv_decode"),
    ],
)
def test_invalid_config_raises_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=f"`?{field}`?"):
        tiny_mea_config(**overrides)


def test_validation_runs_again_after_fields_change(tmp_path):
    """A config edited after construction (as compression does) is re-validated before it is saved; huggingface_hub
    wraps the ValueError in its own StrictDataclassClassValidationError, whose message still names the field."""
    config = tiny_mea_config()
    config.num_component_heads = [2, 5]
    with pytest.raises((ValueError, StrictDataclassClassValidationError), match="`num_component_heads`"):
        config.save_pretrained(tmp_path)
    assert not (tmp_path / "config.json").exists()


def test_no_hlc_is_fine_without_compression():
    config = tiny_mea_config(hlc_keys=False, hlc_values=False, head_norm=None)
    assert config.component_heads_per_layer == [2, 2]


def test_json_round_trip_keeps_every_mea_field(tmp_path):
    config = tiny_mea_config(
        num_component_heads=[2, 1],
        head_norm=None,
        qk_norm=True,
        kv_decode="absorb",
        attention_bias=True,
        o_proj_bias=False,
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
    )
    config.save_pretrained(tmp_path)
    loaded = MEAConfig.from_pretrained(tmp_path)
    for field in (
        "num_component_heads", "hlc_keys", "hlc_values", "head_norm", "qk_norm", "kv_decode",
        "attention_bias", "o_proj_bias", "head_dim", "num_key_value_heads", "vocab_size", "pad_token_id",
    ):  # fmt: skip
        assert getattr(loaded, field) == getattr(config, field), field
    assert loaded.num_component_heads == [2, 1]
    assert loaded.component_heads_per_layer == [2, 1]
    assert loaded.rope_parameters["rope_theta"] == 5000.0
    assert loaded.to_dict() == config.to_dict()
    assert MEAConfig.from_json_file(tmp_path / "config.json").to_dict() == config.to_dict()


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"num_component_heads": "2"}, "num_component_heads"),
        ({"num_component_heads": [1, 1.5]}, "num_component_heads"),
        ({"hlc_keys": "yes"}, "hlc_keys"),
        ({"kv_decode": None}, "kv_decode"),
    ],
)
def test_wrongly_typed_field_is_refused_by_name(overrides, field):
    """Type checks come from huggingface_hub's `@strict` dataclass; its error names the field too."""
    with pytest.raises(StrictDataclassFieldValidationError, match=f"field '{field}'"):
        tiny_mea_config(**overrides)
