"""KV-head reduction: exactness at h' = h, the SVD error bound, calib vs svd on the calibration objective, qk_norm
handling, save/load and remote-code round trips, a converted Llama, sensitivity, and bad input through the CLI."""

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import TINY_DIMS, perturb_, tiny_mea_config, tiny_model
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.masking_utils import create_causal_mask

from mea_hf import MEAForCausalLM
from mea_hf.cli import main as mea_main
from mea_hf.compress.reduce import (
    CALIB_OUTPUT_REFIT,
    CALIB_OUTPUT_RIDGE,
    CALIB_Q_SCALE_HARSH,
    CALIB_Q_SCALE_MILD,
    CALIB_STEP_BLOCKS,
    CALIB_STEPS,
    _refit_output_projection,
    attention_output_error,
    calib_q_scale_for,
    each_layer_compressed_alone,
    effective_projection,
    reduce_kv_heads,
    virtual_keys_values,
)
from mea_hf.compress.sensitivity import kv_fraction_after, suggest_layers
from mea_hf.convert import from_llama
from mea_hf.hub import save_folder

MHA = {"num_key_value_heads": 4}  # h = 4 so that h' can be 1, 2 or 3


def make_model(seed: int = 0, **overrides) -> MEAForCausalLM:
    return tiny_model(seed=seed, **{**MHA, **overrides})


def random_blocks(n: int = 4, length: int = 24, seed: int = 1, vocab: int = TINY_DIMS["vocab_size"]) -> torch.Tensor:
    return torch.randint(3, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def layer_inputs(reference, layer: int, blocks):
    """The normed hidden states (with RoPE and mask) that the reference model feeds layer `layer`."""
    with torch.no_grad():
        hidden = reference(blocks, output_hidden_states=True).hidden_states[layer]
        positions = torch.arange(blocks.shape[1])[None]
        extras = {
            "position_embeddings": reference.model.rotary_emb(hidden, position_ids=positions),
            "attention_mask": create_causal_mask(reference.config, hidden, None, None, position_ids=positions),
        }
        return reference.model.layers[layer].input_layernorm(hidden), extras


def kv_objective(reference, compressed, layer: int, blocks) -> float:
    """Sum of squared errors of layer `layer`'s virtual keys and values, on the hidden states the reference model
    feeds that layer (identical for both when earlier layers are untouched)."""
    normed, _ = layer_inputs(reference, layer, blocks)
    with torch.no_grad():
        ref_k, ref_v = virtual_keys_values(reference.model.layers[layer].self_attn, normed)
        new_k, new_v = virtual_keys_values(compressed.model.layers[layer].self_attn, normed)
    return ((ref_k.double() - new_k.double()).pow(2).sum() + (ref_v.double() - new_v.double()).pow(2).sum()).item()


def output_objective(reference, compressed, layer: int, blocks) -> float:
    """What calib minimises: squared error of layer `layer`'s attention output against the reference's."""
    normed, extras = layer_inputs(reference, layer, blocks)
    with torch.no_grad():
        target = reference.model.layers[layer].self_attn(normed, **extras)[0]
        return attention_output_error(compressed.model.layers[layer].self_attn, [(normed, extras)], [target])


@pytest.mark.parametrize("overrides", [{}, {"attention_bias": True}, {"hlc_keys": False, "hlc_values": False}])
def test_svd_full_rank_is_lossless(overrides):
    model = make_model(**overrides)
    ids = random_blocks()
    reference = logits(model, ids)
    compressed = reduce_kv_heads(copy.deepcopy(model), 4, method="svd")
    assert (
        compressed.model.layers[0].self_attn.k_proj.weight.shape == model.model.layers[0].self_attn.k_proj.weight.shape
    )
    assert not torch.equal(
        compressed.model.layers[0].self_attn.k_proj.weight, model.model.layers[0].self_attn.k_proj.weight
    )
    assert (logits(compressed, ids) - reference).abs().max().item() < 1e-5


@pytest.mark.parametrize("overrides", [{}, {"attention_bias": True}])
def test_svd_error_is_the_discarded_singular_values(overrides):
    model = make_model(**overrides)
    before = {which: effective_projection(model.model.layers[1].self_attn, which) for which in ("k", "v")}
    compressed = reduce_kv_heads(copy.deepcopy(model), 2, layers=[1], method="svd")
    assert compressed.config.num_component_heads == [4, 2]
    attn = compressed.model.layers[1].self_attn
    assert attn.k_proj.out_features == 2 * attn.head_dim and attn.hlc_k.shape == (2, 4)
    for which in ("k", "v"):
        singular = torch.linalg.svdvals(before[which])
        error = torch.linalg.matrix_norm(effective_projection(attn, which) - before[which])
        assert error.item() == pytest.approx(singular[2:].pow(2).sum().sqrt().item(), rel=1e-6)
        assert error.item() > 0
    untouched = compressed.model.layers[0].self_attn
    assert torch.equal(untouched.k_proj.weight, model.model.layers[0].self_attn.k_proj.weight)


@pytest.mark.parametrize("heads", [1, 2, 3])
def test_calib_beats_svd_on_the_calibration_objective(heads):
    model = make_model(attention_bias=True)
    blocks = random_blocks()
    by_svd = reduce_kv_heads(copy.deepcopy(model), heads, layers=[1], method="svd")
    start = reduce_kv_heads(copy.deepcopy(model), heads, layers=[1], method="calib", calib_blocks=blocks, calib_steps=0)
    by_calib = reduce_kv_heads(copy.deepcopy(model), heads, layers=[1], method="calib", calib_blocks=blocks)
    svd_error = output_objective(model, by_svd, 1, blocks)
    start_error = output_objective(model, start, 1, blocks)
    calib_error = output_objective(model, by_calib, 1, blocks)
    assert 0 < calib_error < start_error <= svd_error * (1 + 1e-9)


@pytest.mark.parametrize("composition", ["scalar", "banded"])
def test_calib_keeps_its_start_when_the_refinement_diverges(composition):
    """A refinement whose error over all positions does not end below the start's (here: steps so large that the
    weights overflow and the error is NaN) is undone: the start is returned as it was."""
    model = make_model()
    blocks = random_blocks()
    start = reduce_kv_heads(copy.deepcopy(model), 2, layers=[1], method="calib", calib_blocks=blocks, calib_steps=0,
                            composition=composition)  # fmt: skip
    diverged = reduce_kv_heads(copy.deepcopy(model), 2, layers=[1], method="calib", calib_blocks=blocks, calib_steps=5,
                               calib_lr=1e30, composition=composition)  # fmt: skip
    for name, tensor in start.state_dict().items():
        assert torch.equal(diverged.state_dict()[name], tensor), name


@pytest.mark.parametrize("composition", ["scalar", "banded"])
def test_calib_q_scale_sets_how_far_the_q_projection_moves(composition):
    """The layer's own q projection moves at `calib_q_scale` of the new k/v projections' step size: a vanishing scale
    leaves it where it was while k/v still move, the default moves it. o_proj moves with q (scalar) or is refit after
    the steps whatever the scale (banded, `CALIB_OUTPUT_REFIT`)."""
    model = make_model()
    blocks = random_blocks()

    def refined(q_scale):
        return reduce_kv_heads(copy.deepcopy(model), 2, layers=[1], method="calib", calib_blocks=blocks, calib_steps=5,
                               calib_q_scale=q_scale, composition=composition).model.layers[1].self_attn  # fmt: skip

    start = reduce_kv_heads(copy.deepcopy(model), 2, layers=[1], method="calib", calib_blocks=blocks, calib_steps=0,
                            composition=composition).model.layers[1].self_attn  # fmt: skip
    original = model.model.layers[1].self_attn
    frozen, moved = refined(1e-12), refined(None)
    assert CALIB_OUTPUT_REFIT == {"scalar": False, "banded": True}
    frozen_names = ("q_proj",) if CALIB_OUTPUT_REFIT[composition] else ("q_proj", "o_proj")
    for name in frozen_names:
        assert torch.allclose(getattr(frozen, name).weight, getattr(original, name).weight, rtol=0, atol=1e-9), name
    for name in ("q_proj", "o_proj"):
        assert (getattr(moved, name).weight - getattr(original, name).weight).abs().max() > 1e-4, name
    if CALIB_OUTPUT_REFIT[composition]:
        assert (frozen.o_proj.weight - original.o_proj.weight).abs().max() > 1e-4
    for attn in (frozen, moved):
        assert (attn.k_proj.weight - start.k_proj.weight).abs().max() > 1e-4


@pytest.mark.parametrize("overrides", [{}, {"o_proj_bias": True}])
def test_output_refit_is_the_ridge_regression_towards_the_current_o_proj(overrides):
    """`_refit_output_projection` solves min ||A W - T||^2 + p ||W - W0||^2 (A: o_proj's inputs, with a ones column
    for a bias; p = CALIB_OUTPUT_RIDGE times A's mean squared column norm): checked against torch's least squares
    on the stacked system [A; sqrt(p) I] W = [T; sqrt(p) W0]. It cannot raise the error, and returns its outputs."""
    model = make_model(**overrides)
    blocks = random_blocks()
    compressed = reduce_kv_heads(copy.deepcopy(model), 1, layers=[1], method="calib", calib_blocks=blocks,
                                 calib_steps=0)  # fmt: skip
    attn = compressed.model.layers[1].self_attn
    normed, extras = layer_inputs(model, 1, blocks)
    with torch.no_grad():
        target = model.model.layers[1].self_attn(normed, **extras)[0]
        heads = []
        hook = attn.o_proj.register_forward_hook(lambda module, args, output: heads.append(args[0]))
        before = attention_output_error(attn, [(normed, extras)], [target])
        hook.remove()
        inputs = heads[0].reshape(-1, heads[0].shape[-1]).double()
        current = attn.o_proj.weight.double().t()
        if attn.o_proj.bias is not None:
            inputs = torch.cat([inputs, torch.ones(len(inputs), 1, dtype=inputs.dtype)], dim=1)
            current = torch.cat([current, attn.o_proj.bias.double()[None]])
        root = (CALIB_OUTPUT_RIDGE * inputs.pow(2).sum(0).mean()).sqrt()
        stacked = torch.cat([inputs, root * torch.eye(inputs.shape[1], dtype=inputs.dtype)])
        wanted = torch.cat([target.reshape(-1, target.shape[-1]).double(), root * current])
        expected = torch.linalg.lstsq(stacked, wanted).solution
        outputs, error = _refit_output_projection(attn, [(normed, extras)], [target])
        after = attention_output_error(attn, [(normed, extras)], [target])
    refit = attn.o_proj.weight.double().t()
    if attn.o_proj.bias is not None:
        refit = torch.cat([refit, attn.o_proj.bias.double()[None]])
    assert torch.allclose(refit, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(refit, current, rtol=1e-3, atol=1e-4)
    assert error == pytest.approx(after, rel=1e-5) and after < before
    assert torch.allclose(outputs[0], attn(normed, **extras)[0], rtol=1e-5, atol=1e-5)


def test_calib_default_q_scale_follows_each_layers_cut():
    """With no `calib_q_scale`, a layer keeping at least half its KV heads refines q/o at `CALIB_Q_SCALE_MILD`, a
    harsher cut at `CALIB_Q_SCALE_HARSH`: the default gives exactly what the explicit scale gives (4 -> 2 and
    4 -> 1), and differs from the other scale."""
    assert (calib_q_scale_for(2, 4), calib_q_scale_for(2, 3), calib_q_scale_for(1, 3)) == (
        CALIB_Q_SCALE_MILD, CALIB_Q_SCALE_MILD, CALIB_Q_SCALE_HARSH
    )  # fmt: skip
    assert CALIB_Q_SCALE_MILD != CALIB_Q_SCALE_HARSH
    model, blocks = make_model(), random_blocks()

    def q_weight(heads, q_scale):
        compressed = reduce_kv_heads(copy.deepcopy(model), heads, layers=[1], method="calib", calib_blocks=blocks,
                                     calib_steps=5, calib_q_scale=q_scale)  # fmt: skip
        return compressed.model.layers[1].self_attn.q_proj.weight

    for heads, chosen, other in ((2, CALIB_Q_SCALE_MILD, CALIB_Q_SCALE_HARSH), (1, CALIB_Q_SCALE_HARSH, CALIB_Q_SCALE_MILD)):
        default = q_weight(heads, None)
        assert torch.equal(default, q_weight(heads, chosen)), heads
        assert not torch.equal(default, q_weight(heads, other)), heads


def test_calib_step_groups_cover_every_block_and_position_once():
    """With more blocks than `calib_step_blocks`, each fitting set holds at most that many blocks, and the sets of all
    groups and offsets together hold every (block, position) target of the layer exactly once; the every-position pair
    (for the error checks) holds them all, in block order."""
    from mea_hf.compress.reduce import _attention_output, _fitting_sets, _layer_inputs

    model = make_model(num_component_heads=2)
    layer = model.model.layers[0]
    blocks = random_blocks(n=5, length=11)
    with torch.no_grad():
        batches = list(_layer_inputs(model, blocks, batch_size=2))
        outputs = [_attention_output(layer.self_attn, layer.input_layernorm(hidden), extras)
                   for hidden, extras in batches]  # fmt: skip
        (_, every_target), groups = _fitting_sets(layer, batches, [hidden for hidden, _ in batches], outputs, 3, 2)
        full = torch.cat(outputs)
    torch.testing.assert_close(torch.cat(every_target), full, atol=1e-5, rtol=0)
    assert [len(group) for group in groups] == [3, 3]  # 3 batches (2 + 2 + 1 blocks) in groups of 2 batches
    seen, first_block = torch.zeros(full.shape[:2], dtype=torch.long), 0
    for group in groups:
        for offset, (_, targets) in enumerate(group):
            rows = list(range(10 - offset, -1, -3))[::-1]
            assert sum(target.shape[0] for target in targets) <= 4
            block = first_block
            for target in targets:
                torch.testing.assert_close(target, full[block : block + target.shape[0], rows], atol=1e-5, rtol=0)
                seen[block : block + target.shape[0], rows] += 1
                block += target.shape[0]
        first_block = block
    assert seen.eq(1).all()


def test_calib_step_blocks_fits_groups_in_turn():
    """`calib_step_blocks` below the block count changes the refinement (groups in turn) and keeps calib no worse than
    its start over all blocks; any value covering every block gives one result."""
    model = make_model()
    blocks = random_blocks(n=16)

    def calib(**options):
        return reduce_kv_heads(copy.deepcopy(model), 2, layers=[1], method="calib", calib_blocks=blocks, **options)

    start, everything = calib(calib_steps=0), calib(calib_step_blocks=16)
    same, grouped = calib(calib_step_blocks=64), calib(calib_step_blocks=4)
    for name, tensor in everything.state_dict().items():
        assert torch.equal(same.state_dict()[name], tensor), name
    query_weights = [candidate.model.layers[1].self_attn.q_proj.weight for candidate in (grouped, everything)]
    assert not torch.equal(*query_weights)
    assert output_objective(model, grouped, 1, blocks) < output_objective(model, start, 1, blocks)


def test_calib_schedule_defaults_follow_the_composition():
    """Left unset, calib's steps and blocks per step are those of the composition the model is compressed in
    (`CALIB_STEPS`, `CALIB_STEP_BLOCKS`), and the two compositions' defaults differ."""
    model = make_model()
    blocks = random_blocks(n=16)

    def calib(composition, **options):
        return reduce_kv_heads(copy.deepcopy(model), 2, layers=[1], method="calib", calib_blocks=blocks,
                               composition=composition, **options).state_dict()  # fmt: skip

    for composition, other in (("scalar", "banded"), ("banded", "scalar")):
        default = calib(composition)
        explicit = calib(composition, calib_steps=CALIB_STEPS[composition],
                         calib_step_blocks=CALIB_STEP_BLOCKS[composition])  # fmt: skip
        for name, tensor in default.items():
            assert torch.equal(explicit[name], tensor), (composition, name)
        others = calib(composition, calib_steps=CALIB_STEPS[other], calib_step_blocks=CALIB_STEP_BLOCKS[other])
        assert not all(torch.equal(others[name], tensor) for name, tensor in default.items()), composition


def test_calib_all_layers_runs_layer_by_layer_and_is_exact_at_full_rank():
    model = make_model()
    blocks = random_blocks()
    full = reduce_kv_heads(copy.deepcopy(model), 4, method="calib", calib_blocks=blocks)
    assert (logits(full, blocks) - logits(model, blocks)).abs().max().item() < 1e-5
    half = reduce_kv_heads(copy.deepcopy(model), 2, method="calib", calib_blocks=blocks)
    assert half.config.num_component_heads == 2
    assert all(parameter.grad is None and parameter.requires_grad for parameter in half.parameters())
    # the first layer sees the original inputs, so calib's objective there compares directly with svd's
    by_svd = reduce_kv_heads(copy.deepcopy(model), 2, method="svd")
    assert output_objective(model, half, 0, blocks) < output_objective(model, by_svd, 0, blocks)


def test_qk_norm_svd_refuses_and_calib_fits_hlc_by_least_squares():
    model = make_model(qk_norm=True)
    blocks = random_blocks()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="qk_norm"):
        reduce_kv_heads(model, 2, method="svd")
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())
    unchanged = reduce_kv_heads(copy.deepcopy(model), 4, method="svd")  # h' = h: nothing to approximate
    assert (logits(unchanged, blocks) - logits(model, blocks)).abs().max().item() < 1e-5

    start = reduce_kv_heads(copy.deepcopy(model), 2, layers=[0], method="calib", calib_blocks=blocks, calib_steps=0)
    fitted = kv_objective(model, start, 0, blocks)
    assert fitted > 0  # approximate: mixing normalised components is not normalising mixed keys
    hlc = start.model.layers[0].self_attn.hlc_k
    generator = torch.Generator().manual_seed(3)
    for _ in range(3):  # the start's HLC is a least-squares optimum: any perturbation increases the key error
        nudged = copy.deepcopy(start)
        with torch.no_grad():
            nudged.model.layers[0].self_attn.hlc_k.copy_(hlc + 1e-2 * torch.randn(hlc.shape, generator=generator))
        assert kv_objective(model, nudged, 0, blocks) > fitted
    refined = reduce_kv_heads(copy.deepcopy(model), 2, layers=[0], method="calib", calib_blocks=blocks)
    assert output_objective(model, refined, 0, blocks) < output_objective(model, start, 0, blocks)


def test_bad_arguments_raise_before_any_change():
    model = make_model()
    state = copy.deepcopy(model.state_dict())
    for heads, layers, message in [
        (5, None, "1 to 4"),
        (0, None, "1 to 4"),
        (2, [2], "out of range"),
        (2, [], "empty"),
    ]:
        with pytest.raises(ValueError, match=message):
            reduce_kv_heads(model, heads, layers=layers)
    with pytest.raises(ValueError, match="calib_blocks"):
        reduce_kv_heads(model, 2, method="calib", calib_blocks=torch.empty(0, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="method"):
        reduce_kv_heads(model, 2, method="pca")
    with pytest.raises(ValueError, match="calib_steps"):
        reduce_kv_heads(model, 2, method="calib", calib_blocks=random_blocks(), calib_steps=-1)
    with pytest.raises(ValueError, match="calib_query_stride"):
        reduce_kv_heads(model, 2, method="calib", calib_blocks=random_blocks(), calib_query_stride=0)
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match="calib_step_blocks"):
            reduce_kv_heads(model, 2, method="calib", calib_blocks=random_blocks(), calib_step_blocks=bad)
    for bad in (0, -0.1, float("nan"), float("inf"), True, "0.1"):
        with pytest.raises(ValueError, match="calib_lr"):
            reduce_kv_heads(model, 2, method="calib", calib_blocks=random_blocks(), calib_lr=bad)
        with pytest.raises(ValueError, match="calib_q_scale"):
            reduce_kv_heads(model, 2, method="calib", calib_blocks=random_blocks(), calib_q_scale=bad)
    reduce_kv_heads(model, 2, layers=[0])
    with pytest.raises(ValueError, match="cannot grow"):
        reduce_kv_heads(model, 3, layers=[0])
    assert model.model.layers[1].self_attn.k_proj.weight.equal(state["model.layers.1.self_attn.k_proj.weight"])


REMOTE_SCRIPT = textwrap.dedent(
    """
    import sys, torch

    class BlockMeaHf:
        def find_spec(self, name, path=None, target=None):
            if name == "mea_hf" or name.startswith("mea_hf."):
                raise ImportError("mea_hf is blocked in this test")

    sys.meta_path.insert(0, BlockMeaHf())
    from transformers import AutoModelForCausalLM

    folder, ids_path, out_path = sys.argv[1:]
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    assert "mea_hf" not in sys.modules and type(model).__module__.startswith("transformers_modules")
    ids = torch.load(ids_path)
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits
        generated = model.generate(ids[:1, :8], max_new_tokens=6, do_sample=False)
    torch.save({"logits": logits, "generated": generated, "heads": model.config.num_component_heads}, out_path)
    """
)


@pytest.mark.slow
def test_per_layer_compression_round_trips_through_save_load_and_remote_code(tmp_path):
    model = reduce_kv_heads(make_model(attention_bias=True), 1, layers=[1], method="svd")
    ids = random_blocks(n=2, length=16)
    expected = logits(model, ids)
    expected_tokens = model.generate(ids[:1, :8], max_new_tokens=6, do_sample=False, use_cache=False)
    save_folder(model, tmp_path / "folder")

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "folder").eval()
    assert loaded.config.num_component_heads == [4, 1]
    assert (logits(loaded, ids) - expected).abs().max().item() < 1e-6
    assert torch.equal(loaded.generate(ids[:1, :8], max_new_tokens=6, do_sample=False), expected_tokens)

    torch.save(ids, tmp_path / "ids.pt")
    script = tmp_path / "remote.py"
    script.write_text(REMOTE_SCRIPT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": ""}
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "folder"), str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    remote = torch.load(tmp_path / "out.pt")
    assert remote["heads"] == [4, 1]
    assert (remote["logits"] - expected).abs().max().item() < 1e-6
    assert torch.equal(remote["generated"], expected_tokens)


def test_converted_llama_compresses_exactly_at_full_rank_and_generates_at_half():
    torch.manual_seed(0)
    llama = perturb_(LlamaForCausalLM(LlamaConfig(**{**TINY_DIMS, **MHA, "attention_bias": True})), scale=0.05).eval()
    mea = from_llama(llama)
    ids = random_blocks()
    full = reduce_kv_heads(copy.deepcopy(mea), 4, method="svd")
    assert (logits(full, ids) - logits(llama, ids)).abs().max().item() < 1e-5
    half = reduce_kv_heads(mea, 2, method="calib", calib_blocks=ids)
    assert half.model.layers[0].self_attn.k_proj.out_features == 2 * half.config.head_dim
    cached = half.generate(ids[:2, :8], max_new_tokens=6, do_sample=False)
    uncached = half.generate(ids[:2, :8], max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    half.config.kv_decode = "absorb"  # decode over the compressed cache without rebuilding virtual heads
    assert torch.equal(half.generate(ids[:2, :8], max_new_tokens=6, do_sample=False), uncached)


def test_suggest_layers_picks_least_sensitive_layers_for_the_budget():
    report = {
        "kv_heads": 2, "num_key_value_heads": 4, "component_heads": [4, 4, 4, 4],
        "layers": [{"layer": i, "delta": delta} for i, delta in enumerate([0.5, 0.1, 0.2, 0.9])],
    }  # fmt: skip
    assert suggest_layers(report, 0.75) == [1, 2]
    assert kv_fraction_after(report, [1, 2]) == 0.75
    assert suggest_layers(report, 0.8) == [1, 2]
    assert suggest_layers(report, 1.0) == []
    assert suggest_layers(report, 0.5) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="out of reach"):
        suggest_layers(report, 0.4)


@pytest.fixture(scope="module")
def mea_folder(tmp_path_factory, tokenizer):
    """A tiny MEA folder with the session tokenizer (vocabulary 512), h = 4 KV heads, 2 layers."""
    torch.manual_seed(0)
    config = tiny_mea_config(**MHA, vocab_size=len(tokenizer), qk_norm=False)
    folder = tmp_path_factory.mktemp("models") / "mea"
    save_folder(perturb_(MEAForCausalLM(config), scale=0.05), folder, tokenizer)
    return folder


def test_cli_compress_svd_and_calib(mea_folder, tmp_path, tokenizer, capsys):
    assert (
        mea_main(
            ["compress", "--model", str(mea_folder), "--kv-heads", "2", "--layers", "1", "--out", str(tmp_path / "svd")]
        )
        == 0
    )
    svd = AutoModelForCausalLM.from_pretrained(tmp_path / "svd")
    assert svd.config.num_component_heads == [4, 2]
    assert "75.0%" in (tmp_path / "svd" / "README.md").read_text() and (tmp_path / "svd" / "tokenizer.json").is_file()
    calib_text = tmp_path / "calib.txt"
    calib_text.write_text("\n".join(f"def function_{i}(value):\n    return value * {i}\n" for i in range(200)))
    args = ["compress", "--model", str(mea_folder), "--kv-heads", "1", "--method", "calib", "--calib-data",
            str(calib_text), "--calib-blocks", "4", "--calib-block-size", "32", "--out", str(tmp_path / "calib")]  # fmt: skip
    capsys.readouterr()
    assert mea_main(args) == 0
    progress = capsys.readouterr().err  # the per-layer bar with each layer's error after refinement and at start
    assert "calib layers" in progress and "2/2" in progress and "layer=1" in progress and "start=" in progress
    calib = AutoModelForCausalLM.from_pretrained(tmp_path / "calib")
    assert calib.config.num_component_heads == 1
    assert "--method calib" in (tmp_path / "calib" / "README.md").read_text()


@pytest.mark.parametrize(("composition", "method"), [("scalar", "calib"), ("banded", "calib"), ("scalar", "svd")])
def test_each_layer_compressed_alone_is_reduce_kv_heads_of_that_layer(composition, method):
    """One pass over the calibration blocks gives each named layer compressed alone, as `reduce_kv_heads` of a copy
    with only that layer named does (the same logits up to float rounding: the earlier layers' outputs are carried
    instead of recomputed); layers that cache no more heads than asked are skipped; the model is left unchanged."""
    model = make_model(num_hidden_layers=4, num_component_heads=[4, 4, 2, 4], composition=composition)
    before = copy.deepcopy(model.state_dict())
    blocks, ids = random_blocks(6), random_blocks(2, seed=5)
    trials = list(each_layer_compressed_alone(model, 2, [0, 2, 3], method, blocks if method == "calib" else None))
    assert [index for index, _ in trials] == [0, 3]
    for index, trial in trials:
        reference = reduce_kv_heads(copy.deepcopy(model), 2, layers=[index], method=method, calib_blocks=blocks)
        assert trial.config.component_heads_per_layer == reference.config.component_heads_per_layer
        assert trial.config.component_heads_per_layer[index] == 2
        torch.testing.assert_close(logits(trial, ids), logits(reference, ids), rtol=1e-4, atol=1e-5)
        assert not torch.equal(logits(trial, ids), logits(model, ids))
    assert all(torch.equal(tensor, before[name]) for name, tensor in model.state_dict().items())


@pytest.mark.slow
def test_cli_sensitivity_then_compress_by_budget(mea_folder, tmp_path):
    out = tmp_path / "sens"
    args = ["sensitivity", "--model", str(mea_folder), "--kv-heads", "2", "--val-blocks", "2", "--block-size", "32",
            "--budget", "0.75", "--out", str(out)]  # fmt: skip
    assert mea_main(args) == 0
    report = json.loads((out / "sensitivity.json").read_text())
    assert [entry["layer"] for entry in report["layers"]] == [0, 1]
    assert all(entry["loss"] == pytest.approx(report["baseline_loss"] + entry["delta"]) for entry in report["layers"])
    assert len(report["suggested_layers"]) == 1 and report["suggested_kv_fraction"] == 0.75
    assert (out / "sensitivity.png").read_bytes()[:4] == b"\x89PNG"
    least = min(report["layers"], key=lambda entry: entry["delta"])["layer"]
    assert report["suggested_layers"] == [least]
    args = ["compress", "--model", str(mea_folder), "--budget", "0.75", "--sensitivity", str(out / "sensitivity.json"),
            "--out", str(tmp_path / "budget")]  # fmt: skip
    assert mea_main(args) == 0
    heads = AutoModelForCausalLM.from_pretrained(tmp_path / "budget").config.num_component_heads
    assert heads == [2 if layer == least else 4 for layer in range(2)]


def test_cli_bad_input_gives_a_clear_error_and_writes_nothing(mea_folder, tmp_path, capsys):
    llama_folder = tmp_path / "llama"
    LlamaForCausalLM(LlamaConfig(**TINY_DIMS)).save_pretrained(llama_folder)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    report = {
        "kv_heads": 2,
        "num_key_value_heads": 4,
        "component_heads": [4, 4],
        "layers": [{"layer": 0, "delta": 0.1}],
    }
    (tmp_path / "report.json").write_text(json.dumps(report))
    (tmp_path / "bad.json").write_text("{not json")
    model = ["--model", str(mea_folder)]
    cases = [
        (model + ["--kv-heads", "5"], "--kv-heads must be from 1 to 4"),
        (model + ["--kv-heads", "0"], "--kv-heads must be from 1 to 4"),
        (model + ["--kv-heads", "2", "--layers", "0-2"], "out of range"),
        (model + ["--kv-heads", "2", "--layers", "one"], "--layers"),
        (model + ["--kv-heads", "2", "--method", "calib", "--calib-data", str(empty)], "empty"),
        (model + ["--kv-heads", "2", "--method", "calib", "--calib-step-blocks", "0"], "calib_step_blocks"),
        (model + ["--kv-heads", "2", "--method", "calib", "--calib-lr", "-1"], "calib_lr"),
        (model + ["--kv-heads", "2", "--method", "calib", "--calib-q-scale", "0"], "calib_q_scale"),
        (["--model", str(llama_folder), "--kv-heads", "2"], "mea convert"),
        (["--model", str(tmp_path / "missing"), "--kv-heads", "2"], "no such folder"),
        (model + ["--budget", "0.75"], "--sensitivity"),
        (model + ["--budget", "0.75", "--sensitivity", str(tmp_path / "none.json")], "no such file"),
        (model + ["--budget", "0.5", "--sensitivity", str(tmp_path / "report.json")], "out of reach"),
        (model + ["--budget", "0.75", "--sensitivity", str(tmp_path / "bad.json")], "not a sensitivity report"),
        (model + ["--budget", "0.75", "--sensitivity", str(tmp_path / "report.json"), "--kv-heads", "1"], "differs"),
    ]
    for arguments, message in cases:
        out = tmp_path / "out"
        assert mea_main(["compress", *arguments, "--out", str(out)]) == 2, arguments
        assert message in capsys.readouterr().err, arguments
        assert not out.exists(), arguments
        assert not [path for path in tmp_path.iterdir() if path.name.startswith(".out")], arguments


def test_compressed_folder_recovers_with_the_pretraining_recipe(mea_folder, tmp_path):
    from mea_hf.training.loop import train

    assert mea_main(["compress", "--model", str(mea_folder), "--kv-heads", "2", "--out", str(tmp_path / "half")]) == 0
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"def square_{i}(x):\n    return x * x + {i}\n\n" for i in range(300)))
    summary = train({
        "init_from": str(tmp_path / "half"), "data": str(corpus), "block_size": 32, "batch_size": 4, "max_steps": 3,
        "warmup_steps": 1, "lr": 1e-2, "eval_every": 3, "eval_blocks": 2, "save_every": 100, "progress": False,
        "out": str(tmp_path / "recovery"), "cache_dir": str(tmp_path / "cache"),
    })  # fmt: skip
    compressed = AutoModelForCausalLM.from_pretrained(tmp_path / "half")
    recovered = AutoModelForCausalLM.from_pretrained(summary["final_dir"])
    assert recovered.config.num_component_heads == 2 and summary["tokens_seen"] == 3 * 4 * 32
    assert recovered.model.layers[0].self_attn.k_proj.out_features == 2 * recovered.config.head_dim
    hlc_before, hlc_after = compressed.model.layers[0].self_attn.hlc_k, recovered.model.layers[0].self_attn.hlc_k
    assert hlc_after.shape == (2, 4) and not torch.allclose(hlc_before, hlc_after)


def test_cli_sensitivity_bad_input_gives_a_clear_error_and_writes_nothing(mea_folder, tmp_path, capsys):
    model = ["--model", str(mea_folder)]
    cases = [
        (model + ["--kv-heads", "5"], "--kv-heads must be from 1 to 4"),
        (model + ["--budget", "1.5"], "--budget"),
        (["--model", str(tmp_path / "missing")], "no such folder"),
        (model + ["--data", str(tmp_path / "missing.txt")], "does not exist"),
    ]
    for arguments, message in cases:
        out = tmp_path / "out"
        assert mea_main(["sensitivity", *arguments, "--out", str(out)]) == 2, arguments
        assert message in capsys.readouterr().err, arguments
        assert not out.exists(), arguments


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("stride, fitted_rows", [(4, 6), (2, 12), (1, 23)])
def test_fitting_rows_give_the_layer_output_at_those_positions(attn_implementation, stride, fitted_rows):
    """calib compares outputs at every `stride`-th position only: those equal the full layer's outputs."""
    from mea_hf.compress.reduce import _attention_output, _fitting_inputs

    model = make_model(num_component_heads=2, attn_implementation=attn_implementation)
    blocks = random_blocks(length=23)
    normed, extras = layer_inputs(model, 1, blocks)
    attn = model.model.layers[1].self_attn
    with torch.no_grad():
        full = attn(normed, **extras)[0]
        fitted = _attention_output(attn, *_fitting_inputs(attn, normed, extras, stride))
    rows = list(range(22, -1, -stride))[::-1]
    assert fitted.shape[1] == len(rows) == fitted_rows
    torch.testing.assert_close(fitted, full[:, rows], atol=1e-5, rtol=0)
    # calib's steps move the compared rows by one each time, so the offsets 0 .. stride-1 cover every position once
    covered = []
    for offset in range(stride):
        with torch.no_grad():
            shifted = _attention_output(attn, *_fitting_inputs(attn, normed, extras, stride, offset))
        rows = list(range(22 - offset, -1, -stride))[::-1]
        torch.testing.assert_close(shifted, full[:, rows], atol=1e-5, rtol=0)
        covered += rows
    assert sorted(covered) == list(range(23))
