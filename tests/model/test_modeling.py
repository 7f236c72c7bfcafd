"""MEA models with head norm and random (non-identity) HLC over fewer component heads: gradients, attention backends,
padding, gradient checkpointing, sequence classification, recorded outputs, initialisation, and the claim that
h' = h with identity HLC and no head norm is exactly Llama."""

import os
import subprocess
import sys

import pytest
import torch
from helpers import TINY_DIMS, perturb_, tiny_mea_config, tiny_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSequenceClassification, LlamaConfig, LlamaForCausalLM

from mea_hf import MEAForCausalLM, MEAForSequenceClassification
from mea_hf.modeling_mea import default_hlc

LENGTHS = (11, 6, 2)


def compressed_config(**overrides):
    """Head norm, HLC, 1 component head for 2 KV heads in layer 0 and 2 in layer 1 (a per-layer list)."""
    return tiny_mea_config(num_component_heads=[1, 2], **overrides)


def random_model(model_class=MEAForCausalLM, attn_implementation="eager", seed=0, **overrides):
    return tiny_model(model_class, seed, attn_implementation=attn_implementation, num_component_heads=[1, 2], **overrides)


def prompts(seed=1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, TINY_DIMS["vocab_size"], (length,), generator=generator) for length in LENGTHS]


def left_pad(sequences: list[torch.Tensor]):
    """Left-padded input_ids, attention_mask and the position ids generate() would use."""
    width = max(len(seq) for seq in sequences)
    input_ids = torch.zeros(len(sequences), width, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, seq in enumerate(sequences):
        input_ids[row, width - len(seq) :] = seq
        attention_mask[row, width - len(seq) :] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return input_ids, attention_mask, position_ids


def test_hlc_is_random_and_compressed():
    model = random_model()
    first, second = model.model.layers[0].self_attn, model.model.layers[1].self_attn
    assert first.hlc_k.shape == (1, 2) and second.hlc_k.shape == (2, 2)
    assert first.k_proj.out_features == first.head_dim and second.v_proj.out_features == 2 * second.head_dim
    assert not torch.allclose(second.hlc_v, torch.eye(2), atol=1e-2)
    assert not torch.allclose(first.head_norm.weight, torch.ones_like(first.head_norm.weight), atol=1e-2)


def test_forward_backward_reaches_every_parameter():
    model = random_model().train()
    input_ids, attention_mask, _ = left_pad(prompts())
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    loss = model(input_ids, attention_mask=attention_mask, labels=labels).loss
    assert torch.isfinite(loss)
    loss.backward()
    names = {name for name, _ in model.named_parameters()}
    assert {"model.layers.0.self_attn.hlc_k", "model.layers.0.self_attn.hlc_v"} <= names
    assert "model.layers.1.self_attn.head_norm.weight" in names
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name


def test_eager_equals_sdpa():
    eager, sdpa = random_model(attn_implementation="eager"), random_model(attn_implementation="sdpa")
    assert sdpa.config._attn_implementation == "sdpa"
    input_ids, attention_mask, position_ids = left_pad(prompts())
    with torch.no_grad():
        logits_eager = eager(input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
        logits_sdpa = sdpa(input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    real = attention_mask.bool()
    assert (logits_eager[real] - logits_sdpa[real]).abs().max() <= 1e-5


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_left_padded_batch_equals_each_example_alone(attn_implementation):
    model = random_model(attn_implementation=attn_implementation)
    sequences = prompts()
    input_ids, attention_mask, position_ids = left_pad(sequences)
    with torch.no_grad():
        batched = model(input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
        for row, seq in enumerate(sequences):
            alone = model(seq[None]).logits[0]
            assert (batched[row, -len(seq) :] - alone).abs().max() <= 1e-5


def _loss_grads_and_layer_calls(model, input_ids):
    """Loss, gradients, and how often layer 0's attention ran (twice per step when its activations are recomputed)."""
    calls = []
    hook = model.model.layers[0].self_attn.register_forward_hook(lambda *args: calls.append(1))
    model.zero_grad()
    loss = model(input_ids, labels=input_ids).loss
    loss.backward()
    hook.remove()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}, len(calls)


def test_activation_checkpointing_gives_the_same_loss_and_grads():
    model = random_model().train()
    input_ids = torch.randint(3, TINY_DIMS["vocab_size"], (2, 10))
    loss, grads, calls = _loss_grads_and_layer_calls(model, input_ids)
    model.activation_checkpointing_enable()
    loss_ckpt, grads_ckpt, calls_ckpt = _loss_grads_and_layer_calls(model, input_ids)
    assert (calls, calls_ckpt) == (1, 2)  # the layer really was recomputed in the backward pass
    assert torch.allclose(loss, loss_ckpt, atol=1e-6)
    for name, grad in grads.items():
        assert torch.allclose(grad, grads_ckpt[name], atol=1e-6), name


def test_sequence_classification_uses_the_last_real_token():
    model = random_model(MEAForSequenceClassification, num_labels=3)
    assert isinstance(AutoModelForSequenceClassification.from_config(compressed_config()), MEAForSequenceClassification)
    sequences = prompts()
    input_ids, attention_mask, position_ids = left_pad(sequences)
    labels = torch.tensor([0, 2, 1])
    out = model(input_ids, attention_mask=attention_mask, position_ids=position_ids, labels=labels)
    assert out.logits.shape == (3, 3) and torch.isfinite(out.loss)
    with torch.no_grad():
        for row, seq in enumerate(sequences):
            assert torch.allclose(out.logits[row], model(seq[None]).logits[0], atol=1e-5)
    out.loss.backward()
    assert model.score.weight.grad.abs().sum() > 0
    assert model.model.layers[0].self_attn.hlc_k.grad.abs().sum() > 0


def test_hidden_states_and_attentions_are_returned_per_layer():
    model = random_model()
    input_ids = torch.randint(3, TINY_DIMS["vocab_size"], (2, 7))
    with torch.no_grad():
        out = model(input_ids, output_hidden_states=True, output_attentions=True)
    layers = TINY_DIMS["num_hidden_layers"]
    assert len(out.hidden_states) == layers + 1
    assert all(h.shape == (2, 7, TINY_DIMS["hidden_size"]) for h in out.hidden_states)
    assert not torch.equal(out.hidden_states[0], out.hidden_states[1])
    assert len(out.attentions) == layers
    for attentions in out.attentions:
        assert attentions.shape == (2, TINY_DIMS["num_attention_heads"], 7, 7)
        assert torch.allclose(attentions.sum(-1), torch.ones(2, 4, 7), atol=1e-5)
        assert attentions.triu(1).abs().max() == 0  # causal
    with torch.no_grad():
        assert torch.equal(model.model(input_ids, output_hidden_states=True).hidden_states[-1], out.hidden_states[-1])


def test_default_hlc():
    assert torch.equal(default_hlc(3, 3), torch.eye(3))
    assert torch.equal(default_hlc(1, 2), torch.tensor([[1.0, 1.0]]))
    assert torch.equal(default_hlc(2, 4), torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]]))
    assert torch.equal(default_hlc(3, 4).sum(0), torch.ones(4))  # every virtual head copies exactly one component


def _assert_initial_mea_parameters(model):
    for attention in (layer.self_attn for layer in model.model.layers):
        expected = default_hlc(attention.num_component_heads, attention.num_kv_heads)
        assert torch.equal(attention.hlc_k.detach(), expected) and torch.equal(attention.hlc_v.detach(), expected)
        for norm in (attention.head_norm, attention.q_norm, attention.k_norm):
            assert torch.equal(norm.weight.detach(), torch.ones_like(norm.weight))


def test_init_weights_from_config():
    model = MEAForCausalLM(compressed_config(qk_norm=True))
    _assert_initial_mea_parameters(model)
    assert torch.equal(model.model.layers[1].self_attn.hlc_k.detach(), torch.eye(2))  # h' = h: identity
    assert torch.equal(model.model.layers[0].self_attn.hlc_k.detach(), torch.ones(1, 2))  # documented default


def test_init_weights_for_parameters_missing_from_a_checkpoint(tmp_path):
    """from_pretrained builds the model on the meta device and runs `_init_weights` only for the missing weights:
    HLC and head-norm scales absent from a checkpoint must come out as the documented initial values."""
    model = perturb_(MEAForCausalLM(compressed_config(qk_norm=True)))
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    dropped = [name for name in weights if name.endswith(("hlc_k", "hlc_v", "norm.weight")) and ".self_attn." in name]
    assert len(dropped) == 2 * 5
    save_file(
        {k: v for k, v in weights.items() if k not in dropped},
        tmp_path / "model.safetensors",
        metadata={"format": "pt"},
    )
    loaded = MEAForCausalLM.from_pretrained(tmp_path)
    _assert_initial_mea_parameters(loaded)
    assert torch.equal(loaded.model.layers[0].self_attn.q_proj.weight, model.model.layers[0].self_attn.q_proj.weight)


def test_identity_hlc_without_head_norm_is_exactly_llama():
    """h' = h, W_lc = I and no head norm: MEA attention *is* standard attention (docs/design.md §1)."""
    config = tiny_mea_config(head_norm=None)
    mea = perturb_(MEAForCausalLM(config)).eval()
    with torch.no_grad():
        for layer in mea.model.layers:
            layer.self_attn.hlc_k.copy_(torch.eye(2))
            layer.self_attn.hlc_v.copy_(torch.eye(2))
    llama = LlamaForCausalLM(LlamaConfig(**TINY_DIMS)).eval()
    result = llama.load_state_dict(mea.state_dict(), strict=False)
    assert not result.missing_keys and all(key.endswith(("hlc_k", "hlc_v")) for key in result.unexpected_keys)
    input_ids, attention_mask, _ = left_pad(prompts())
    with torch.no_grad():
        logits_mea = mea(input_ids, attention_mask=attention_mask).logits
        logits_llama = llama(input_ids, attention_mask=attention_mask).logits
    real = attention_mask.bool()
    assert (logits_mea[real] - logits_llama[real]).abs().max() <= 1e-5
    # and the HLC really is in the computation: a non-identity mix changes the logits
    with torch.no_grad():
        mea.model.layers[0].self_attn.hlc_v[1, 0] = 0.5
        assert (mea(input_ids, attention_mask=attention_mask).logits[real] - logits_llama[real]).abs().max() > 1e-3


def test_flex_attention_is_refused_clearly():
    """`_supports_flex_attn` is False (the absorbed decode path takes dense masks): asking for it must fail loudly."""
    with pytest.raises(ValueError, match="flex_attention"):
        MEAForCausalLM._from_config(compressed_config(), attn_implementation="flex_attention")


TP_SCRIPT = """
import sys, torch, torch.distributed as dist
from transformers import AutoModelForCausalLM
torch.set_num_threads(1)
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], tp_plan="auto", trust_remote_code=True).eval()
with torch.no_grad():
    logits = model(torch.load(sys.argv[2])).logits
if dist.get_rank() == 0:
    torch.save(logits, sys.argv[3])
"""


@pytest.mark.slow
def test_tensor_parallel_plan_gives_the_same_logits(tmp_path):
    """`tp_plan="auto"` over 2 CPU processes (gloo) must reproduce the single-process logits, head norm and
    compressed heads included (an attention plan sharding q_proj/o_proj got this wrong)."""
    model = random_model()
    model.save_pretrained(tmp_path / "model")
    input_ids = torch.randint(3, TINY_DIMS["vocab_size"], (2, 9))
    torch.save(input_ids, tmp_path / "inputs.pt")
    (tmp_path / "tp.py").write_text(TP_SCRIPT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "tp.py"]
    result = subprocess.run(
        [*command, str(tmp_path / "model"), "inputs.pt", "logits.pt"],
        check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    with torch.no_grad():
        expected = model(input_ids).logits
    assert (torch.load(tmp_path / "logits.pt") - expected).abs().max() <= 1e-5
