"""peft LoRA on the attention projections of an MEA model: trains, touches only LoRA weights, saves and reloads,
merges."""

import torch
from helpers import TINY_DIMS, tiny_model
from peft import LoraConfig, PeftModel, get_peft_model

from mea_hf import MEAForCausalLM

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def base_model():
    return tiny_model(scale=0.05, num_component_heads=[1, 2])


def test_lora_trains_saves_reloads_and_merges(tmp_path):
    model = get_peft_model(base_model(), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    # every attention projection of every layer is adapted (k/v project only the component heads)
    for target in TARGETS:
        assert sum(f"{target}.lora_A" in name for name in trainable) == TINY_DIMS["num_hidden_layers"], target
    assert model.base_model.model.model.layers[0].self_attn.k_proj.lora_B["default"].out_features == 16  # 1 head
    frozen_before = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}

    generator = torch.Generator().manual_seed(0)
    batch = torch.randint(3, TINY_DIMS["vocab_size"], (4, 16), generator=generator)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(30):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    for name, parameter in model.named_parameters():
        if name in frozen_before:
            assert torch.equal(parameter, frozen_before[name]), f"{name} changed but is not a LoRA weight"
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=batch).logits

    model.save_pretrained(tmp_path / "adapter")
    saved = {path.name for path in (tmp_path / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= saved
    reloaded = PeftModel.from_pretrained(base_model(), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=batch).logits, logits)
        base_logits = base_model()(batch).logits
    assert (logits - base_logits).abs().max() > 1e-3  # the adapter really changes the model

    merged = reloaded.merge_and_unload()
    assert type(merged) is MEAForCausalLM
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    with torch.no_grad():
        assert (merged(batch).logits - logits).abs().max() <= 1e-5
