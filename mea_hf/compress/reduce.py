"""KV-head reduction ("virtual heads", arXiv 2601.19611 §5.2): cache fewer component heads, rebuild the h virtual
heads with Head-level Linear Composition (HLC).

Per layer, the virtual key head j is an affine map of the normed hidden state x:
    K_j = sum_c HLC_k[c, j] (x W_c^T + b_c)            (RoPE commutes with head mixing, so it can be ignored)
Stacking [W_j | b_j] of every virtual head as one column gives M, a ((D+1)*d) x h matrix (the bias is the weight on
a constant input 1). Keeping h' < h component heads means writing M ~= A' HLC' with A' of rank h'.

Every factorisation goes through `factors.py`, one routine for the three families (scalar HLC; under
`composition="banded"`, complex per-RoPE-pair key weights and d x d value maps).

- `method="svd"` (the paper): the truncated SVD of the stacked projections, M ~= U_h' (S V^T)_h'. Data-free; the
  error ||M - A' HLC'||_F is sqrt(sum of the discarded s^2) (per family: per RoPE pair for banded keys, over all h*d
  channels for banded values).
- `method="calib"` (ours): make the layer's attention output on real calibration text match the original model's.
  1. Start: the best, by that output error, of the svd solution, the PCA of the keys/values the model actually
     produces (top eigenvectors of their Gram matrix in the family's row space), and for banded layers the same PCA
     weighted by the energy of the queries that read each key pair and by the o_proj column norms of each value
     channel.
  2. Refine: `calib_steps` Adam steps on the new k/v projections and HLC and on the layer's q projection
     (which adapts to the compressed keys; `calib_q_scale` scales its step size; scalar layers: and o_proj),
     minimising the squared error of the attention sub-layer output (after softmax, head norm and o_proj) against the original
     model's residual stream after that sub-layer minus the current one (so a layer also corrects the drift of the
     compressed layers before it).
     Each step compares every `CALIB_QUERY_STRIDE`-th position, from an offset that moves by one each step, so the
     steps together fit every position at a fraction of the cost; with more calibration blocks than
     `CALIB_STEP_BLOCKS`, each step also takes only one group of that many blocks, the groups in turn (more text for
     the same price per step). The step sizes decay to zero on a cosine.
  3. Banded layers (`CALIB_OUTPUT_REFIT`) then refit o_proj: the output is linear in it, so one ridge regression over
     every block and position gives the best o_proj for the refined keys and values (pulled towards the current one
     by `CALIB_OUTPUT_RIDGE`). Scalar layers move o_proj with Adam instead, at the q step size.
  The result is kept only if its error over all positions is below the start's, so calib is never worse than its
  start on this objective.
  Layers are processed in order, each on the hidden states of the already-compressed layers before it (and of the
  original model, for the targets), so only one layer's activations are held (7B-size models fit in modest memory;
  the refinement wants a GPU there).

Exact and approximate:
- h' = h reproduces the model exactly with both methods (orthogonal change of component basis); so does any h'
  >= the rank of M (svd) or of the calibration keys (calib). Attention biases are handled exactly as part of M.
- Values are always linear, so everything above holds for V.
- `qk_norm` (Qwen3-style RMSNorm on each component key before RoPE) is not linear: mixing normalised components is
  not normalising mixed keys. `svd` refuses to compress keys of such a model (its weight-space error bound would be
  meaningless). `calib` approximates: its start builds each new component from the top eigen-directions of the
  real (normalised) virtual keys, divides each old component's projection by its mean RMS so the new pre-norm
  projection mirrors the normalised mix, and fits HLC' by least squares on the calibration keys; the refinement
  then works on the true (normalised) model. Layers left at h' = h are not touched, so they stay exact.
"""

import copy
import math
from dataclasses import dataclass, replace

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask

from ..configuration_mea import COMPOSITIONS
from ..modeling_mea import banded_from_scalar, compose_heads, default_hlc
from . import factors
from .temperature import check_sharpen, sharpen_layers

METHODS = ("svd", "calib")
CALIB_BATCH = 8
# How many calibration blocks (of 256 tokens, say) `mea compress`, `mea sensitivity` and the benchmarks take by default,
# by composition. Before the o_proj refit, on SmolLM2-135M banded 3 -> 2 with 45 steps of 16 blocks, bits/byte at q/o
# scale 1 (and 0.5): 16 blocks +3.57% (+3.31%), 32 +3.36% (+3.10%), 40 +3.15% (+2.98%), 48 +2.73%, in 145 / 166 / 176
# (171) / 193 s on one idle 2-core machine (only the start, its checks and the forward passes grow with the blocks);
# scalar calib keeps that 40. Since banded layers refit o_proj over every block and position (`CALIB_OUTPUT_REFIT`),
# more text pays more than more steps: with 200 steps of 2 blocks, 3 -> 1 gave +15.36% with 40 blocks, +13.98% with 60
# and +12.91% with 80 (80 blocks with 100 steps +15.54%), 3 -> 2 +2.49% with 60 and +2.21% with 80 (60 blocks with 100
# steps +3.00%). 60 is what keeps both cuts under 3 minutes: 173 s / 168 s (3 -> 2 / 3 -> 1) against 186 s / 192 s
# for 80, in one run, alone, on a 2-core AVX2 machine (`benchmarks/bench_real.py`, load, compress and save).
CALIB_BLOCKS = {"scalar": 40, "banded": 60}
# Refinement steps per layer, by composition. Every step costs the same (no early stop: the step sizes follow a fixed
# cosine). Smaller, more numerous steps are what 3 -> 1 wants (bits/byte against the converted model; 40 blocks;
# seconds of the compression alone, with o_proj still moved by Adam, one AVX-512 machine): 45 steps of 16 blocks
# +19.6% (170 s), 90 of 16 +16.5% (271 s), 90 of 8 +17.1% (180 s), 180 of 4 +15.6% (196 s), 300 of 2 +15.4% (197 s),
# 600 of 2 +13.7% (329 s). Banded: 200 steps of `CALIB_STEP_BLOCKS` with `CALIB_BLOCKS` (see there).
# Scalar HLC keeps the earlier 45 steps of 16 blocks: 128 of 4 made scalar calib worse (3 -> 2 +28.9% against +25.0%,
# 3 -> 1 +207% against +81.6%).
CALIB_STEPS = {"scalar": 45, "banded": 200}
# Each step compares the attention output at every 4th position (4 offsets in turn); keys and values still cover every
# position, so a step does a quarter of the attention and o_proj work. Measured on SmolLM2-135M banded 3 -> 2 when the
# rows were still fixed (before q/o were refined): +4.24% bits/byte against +3.71% comparing every position
# (docs/design.md §4).
CALIB_QUERY_STRIDE = 4
# Adam's first step size, as a fraction of each refined tensor's RMS, decayed to 0 on a cosine. With the compared rows
# moving every step (above), SmolLM2-135M banded, 50 steps: +3.47% bits/byte at 3 -> 2 and +20.4% at 3 -> 1, against
# +4.08% and +22.5% for a fixed set of rows with the step sizes (0.06) halved after each worse step; at 3 -> 1 (45
# steps) 0.01 / 0.04 gave +22.4% / +23.9% against +20.8%. It depends on the model: the quickstart's toy model, whose
# start is far off, wants 0.06 and more steps (`mea_hf.recipes.quickstart`).
CALIB_LR = 0.018
# Each refinement step fits at most this many calibration blocks (whole batches of `CALIB_BATCH`), a group in turn; the
# start, its error and the final check still use every block. A step of 4 blocks costs about a third of one of 16, so
# the 3-minute budget bought 128 steps instead of 45: on SmolLM2-135M banded, +2.70% bits/byte at 3 -> 2 (was +2.98%)
# and +16.8% at 3 -> 1 (was +19.6%). Since o_proj is refit in closed form (`CALIB_OUTPUT_RIDGE`) instead of moving
# with Adam, steps are cheaper: with 40 blocks, 300 steps of 2 blocks gave +2.68% and +14.45% (291 s and 256 s on one
# 2-core AVX2 machine, where 128 of 4 with o_proj in Adam took 203 s at 3 -> 1 the same day). Scalar HLC keeps 16.
CALIB_STEP_BLOCKS = {"scalar": 16, "banded": 2}
# The step size of the layer's own q projection (which only adapts to the new keys), as a fraction of that of the new
# k/v projections and HLC, by default set by how much of its KV a layer keeps (`calib_q_scale_for`). A smaller one fits
# less of the calibration text's noise but adapts less, which suits mild compression only. Tuned when o_proj still
# moved with q at this scale: on SmolLM2-135M banded with 40 calibration blocks, 3 -> 2 gave +2.98% bits/byte at 0.5
# against +3.15% at 1, and 3 -> 1 +19.58% at 1 against +20.74% at 0.5 (16 blocks: +3.31% / +3.58% and +20.81% /
# +21.69%; 0.25 and 2 were no better); with o_proj refit, 2 for q alone was worse than 1 at 3 -> 1 (held-out error of
# four layers 0.960 against 0.951 of the scalar-1 baseline with o in Adam).
CALIB_Q_SCALE_MILD = 0.5
CALIB_Q_SCALE_HARSH = 1.0
# After the Adam steps, o_proj is refit in closed form (`_refit_output_projection`), pulled towards its weights by this
# times the mean diagonal of the Gram matrix of its inputs. On SmolLM2-135M banded 3 -> 1 (250 steps of 2 blocks; the
# attention-output error on 16 held-out blocks of layers 2, 10, 20 and 28, against o_proj moved by Adam with q):
# 0.946 of it at 0.1, 0.951 at 0.3, 0.965 at 1; the refit after Adam moved o_proj too, 0.955 at 0.3; refitting also
# before the steps, 1.054 (worse). Over all 30 layers, 300 steps of 2 blocks: +14.45% bits/byte against +15.36%.
CALIB_OUTPUT_RIDGE = 0.1
# Which compositions refit o_proj that way; the others move it with Adam, at the q step size. On SmolLM2-135M scalar
# calib (45 steps of 16 blocks) the refit helped at 3 -> 2 (+14.98% bits/byte against +25.04%) but broke 3 -> 1
# (+257% against +81.6%; +67.4% when the refit skipped each block's first position, the attention sink with massive
# activations, which in turn made banded 3 -> 1 worse, +16.98% against +14.45%), so scalar keeps Adam.
CALIB_OUTPUT_REFIT = {"scalar": False, "banded": True}


def calib_blocks_for(composition: str, requested: int | None = None) -> int:
    """How many calibration blocks to take: `requested`, or `CALIB_BLOCKS` of `composition` when it is None."""
    return CALIB_BLOCKS[composition] if requested is None else requested


def calib_q_scale_for(heads: int, kv_heads: int) -> float:
    """calib's default q step-size scale for a layer cut from `kv_heads` to `heads` component heads:
    `CALIB_Q_SCALE_MILD` if it keeps at least half of them, else `CALIB_Q_SCALE_HARSH`."""
    return CALIB_Q_SCALE_MILD if 2 * heads >= kv_heads else CALIB_Q_SCALE_HARSH


@dataclass(frozen=True)
class CalibOptions:
    """How calib refines each layer: `steps` Adam steps from a peak step size `lr` (times each tensor's RMS; `q_scale`
    times that for the layer's q projection and, in scalar layers, o_proj; None: `calib_q_scale_for` the layer),
    each comparing every `query_stride`-th position of at most `step_blocks` blocks. `steps` and `step_blocks` left None
    take the default of the model's composition (`for_composition`)."""

    steps: int | None = None
    query_stride: int = CALIB_QUERY_STRIDE
    step_blocks: int | None = None
    lr: float = CALIB_LR
    q_scale: float | None = None

    def for_composition(self, composition: str) -> "CalibOptions":
        """These options with `steps` and `step_blocks` left None set to `composition`'s defaults."""
        steps = CALIB_STEPS[composition] if self.steps is None else self.steps
        step_blocks = CALIB_STEP_BLOCKS[composition] if self.step_blocks is None else self.step_blocks
        return replace(self, steps=steps, step_blocks=step_blocks)

    def __post_init__(self):
        for name, minimum in (("steps", 0), ("query_stride", 1), ("step_blocks", 1)):
            value = getattr(self, name)
            if value is None and name in ("steps", "step_blocks"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                kind = "a non-negative" if minimum == 0 else "a positive"
                raise ValueError(f"calib_{name} must be {kind} integer, got {value!r}.")
        for name in ("lr", "q_scale"):
            value = getattr(self, name)
            if name == "q_scale" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"calib_{name} must be a positive number, got {value!r}.")


def parse_layers(spec: str, num_layers: int) -> list[int]:
    """Layer indices from "4-11", "0,3,5" or a mix ("0-2,7"); ranges are inclusive. Raises on bad or out-of-range."""
    layers: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        try:
            if "-" in part:
                first, last = (int(value) for value in part.split("-"))
                if first > last:
                    raise ValueError
                layers.update(range(first, last + 1))
            else:
                layers.add(int(part))
        except ValueError:
            raise ValueError(f"--layers {spec!r}: expected indices like '4-11' or '0,3,5', got {part!r}.") from None
    check_layers(sorted(layers), num_layers)
    return sorted(layers)


def check_layers(layers, num_layers: int) -> None:
    bad = [layer for layer in layers if not 0 <= layer < num_layers]
    if bad or not layers:
        raise ValueError(f"layer index {bad or 'list (empty)'} out of range: the model has layers 0-{num_layers - 1}.")


def _targets(config, num_component_heads, layers) -> dict[int, int]:
    """{layer: new h'} for every layer to compress, after checking each against the model."""
    num_layers, kv_heads = config.num_hidden_layers, config.num_key_value_heads
    if isinstance(num_component_heads, (list, tuple)):
        if layers is not None or len(num_component_heads) != num_layers:
            raise ValueError(f"a per-layer num_component_heads needs {num_layers} entries and layers=None.")
        targets = dict(enumerate(num_component_heads))
    else:
        layers = range(num_layers) if layers is None else sorted(set(layers))
        check_layers(list(layers), num_layers)
        targets = {layer: num_component_heads for layer in layers}
    current = config.component_heads_per_layer
    for layer, heads in targets.items():
        if isinstance(heads, bool) or not isinstance(heads, int) or not 1 <= heads <= kv_heads:
            raise ValueError(
                f"num_component_heads must be an integer from 1 to {kv_heads} (the KV heads), got {heads!r}."
            )
        if heads > current[layer]:
            raise ValueError(f"layer {layer} already caches {current[layer]} heads; cannot grow it to {heads}.")
    return targets


def effective_projection(attn, which: str) -> torch.Tensor:
    """M: ((D+1)*d, h) float64, column j = [W_j | b_j] of virtual head j of keys ("k") or values ("v")."""
    rows = factors.virtual_rows(attn, which)
    return rows.reshape(rows.shape[0], -1).t()


def virtual_keys_values(attn, normed_hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The h virtual keys and values (batch, seq, h, d) of `attn` for normed hidden states, before RoPE (RoPE is
    one rotation per position and pair for all heads, so it changes no Gram matrix or mixing error)."""
    shape = (*normed_hidden.shape[:-1], -1, attn.head_dim)
    keys = attn.k_proj(normed_hidden).view(shape)
    if attn.config.qk_norm:
        keys = attn.k_norm(keys)
    values = attn.v_proj(normed_hidden).view(shape)
    return tuple(
        compose_heads(components.transpose(1, 2), mixing).transpose(1, 2)
        for components, mixing in zip((keys, values), attn.mixing(), strict=True)
    )


def _install(attn, which: str, rows: torch.Tensor, hlc: torch.Tensor) -> None:
    """Install component rows (h', d, D+1) as the new k/v projection and `hlc` as the new HLC parameter."""
    old = attn.k_proj if which == "k" else attn.v_proj
    heads = rows.shape[0]
    new = nn.Linear(old.in_features, heads * attn.head_dim, bias=old.bias is not None)
    new.to(device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(rows[..., :-1].reshape(heads * attn.head_dim, -1))
        if new.bias is not None:
            new.bias.copy_(rows[..., -1].reshape(-1))
    setattr(attn, f"{which}_proj", new)
    setattr(attn, f"hlc_{which}", nn.Parameter(hlc.to(device=old.weight.device, dtype=old.weight.dtype)))


def _install_fit(attn, which: str, heads: int, gram=None, metric=None) -> None:
    """Factor the layer's virtual keys or values into `heads` components (`factors.fit`): the truncated SVD without
    `gram`, the PCA of real heads with a data Gram matrix, weighted by `metric` if given."""
    family = factors.family_of(attn, which)
    matrix = factors.to_matrix(factors.virtual_rows(attn, which), family)
    gram = factors.weight_gram(matrix) if gram is None else gram
    mixing, components = factors.fit(matrix, gram, factors.rank_of(family, heads, attn.head_dim), metric)
    hlc = factors.hlc_parameter(mixing, family, heads, attn.head_dim)
    _install(attn, which, factors.from_matrix(components, family, attn.head_dim), hlc)


def _enable_hlc(model) -> None:
    """Give every layer explicit HLC matrices (identity where there were none), as h' < h requires."""
    for which in ("k", "v"):
        flag = "hlc_keys" if which == "k" else "hlc_values"
        if not getattr(model.config, flag):
            for layer in model.model.layers:
                attn = layer.self_attn
                weight = attn.q_proj.weight
                identity = default_hlc(attn.num_kv_heads, attn.num_kv_heads).to(weight.device, weight.dtype)
                setattr(attn, f"hlc_{which}", nn.Parameter(identity))
            setattr(model.config, flag, True)


def check_composition(config, composition: str | None) -> None:
    """Refuse a `composition` the model cannot be rewritten into: only scalar -> banded is exact."""
    if composition is None or composition == config.composition:
        return
    if composition not in COMPOSITIONS or config.composition != "scalar":
        raise ValueError(
            f"composition must be one of {COMPOSITIONS} and can only go from 'scalar' to 'banded'; the model has "
            f"{config.composition!r}, asked for {composition!r}."
        )
    if config.qk_norm:
        raise ValueError(
            "composition='banded' is not supported for qk_norm models (Qwen3): normalised component keys do not mix "
            "linearly per RoPE pair. Keep the scalar composition for them."
        )


def _use_composition(model, composition: str | None) -> None:
    """Rewrite a scalar-HLC model in `composition="banded"` form, exactly (`banded_from_scalar`)."""
    if composition is None or composition == model.config.composition:
        return
    for layer in model.model.layers:
        attn = layer.self_attn
        for which in ("k", "v"):
            hlc = getattr(attn, f"hlc_{which}")
            setattr(attn, f"hlc_{which}", nn.Parameter(banded_from_scalar(hlc.detach(), which, attn.head_dim)))
    model.config.composition = composition


def _compress_layer_svd(attn, heads: int) -> None:
    if attn.config.qk_norm:
        return  # only reached with h' unchanged (see _refuse_svd_qk_norm): a basis change would not be exact
    for which in ("k", "v"):
        _install_fit(attn, which, heads)


def _refuse_svd_qk_norm(config, targets: dict[int, int]) -> None:
    current = config.component_heads_per_layer
    if config.qk_norm and any(heads < current[layer] for layer, heads in targets.items()):
        raise ValueError(
            "method='svd' cannot compress the keys of a qk_norm model: each component key is RMS-normalised before "
            "mixing, so a weight-space SVD does not describe the keys. Use method='calib' (fits the mix on real keys)."
        )


class _LayerStats:
    """What the calibration start needs of one layer, accumulated over batches: the Gram matrices of its real virtual
    keys/values in each one's family, and for banded layers the metric of `factors.fit`: per RoPE pair and virtual
    head the energy of the queries that read it (keys), per value channel the squared o_proj column norms."""

    def __init__(self, attn):
        self.attn = attn
        self.gram = {"k": 0.0, "v": 0.0}
        self.query_energy = 0.0
        self.component_sq = 0.0  # qk_norm: mean squared pre-norm component key, per component
        self.count = 0

    def add(self, normed_hidden: torch.Tensor) -> None:
        attn = self.attn
        for which, heads in zip(("k", "v"), virtual_keys_values(attn, normed_hidden), strict=True):
            self.gram[which] = self.gram[which] + factors.data_gram(heads, factors.family_of(attn, which)).cpu()
        if attn.config.composition == "banded":
            queries = attn.q_proj(normed_hidden).double().view(-1, attn.num_kv_heads, attn.num_key_value_groups, attn.head_dim)
            half = attn.head_dim // 2
            self.query_energy = self.query_energy + (queries[..., :half] ** 2 + queries[..., half:] ** 2).sum((0, 2)).t().cpu()
        if attn.config.qk_norm:
            raw = attn.k_proj(normed_hidden).double()
            raw = raw.view(*raw.shape[:-1], attn.num_component_heads, -1)
            self.component_sq = self.component_sq + raw.pow(2).mean(-1).sum((0, 1))
            self.count += raw.shape[0] * raw.shape[1]

    def metric(self, which: str) -> torch.Tensor:
        """`factors.fit`'s metric for banded keys (d/2, h) or values (1, h*d)."""
        if which == "k":
            return self.query_energy
        attn = self.attn
        columns = attn.o_proj.weight.detach().double().cpu().pow(2).sum(0)  # (H*d,)
        if attn.head_norm is not None:
            columns = columns * attn.head_norm.weight.detach().double().cpu().reshape(-1).pow(2)
        per_group = columns.view(attn.num_kv_heads, attn.num_key_value_groups, attn.head_dim).sum(1)
        return per_group.reshape(1, -1)


def _install_pca(attn, heads: int, stats: _LayerStats, weighted: bool = False) -> None:
    """Components and HLC from the PCA of the real keys/values (`factors.fit` with their Gram matrices); banded
    layers may weight it by `stats.metric`."""
    for which in ("v", "k") if not attn.config.qk_norm else ("v",):
        metric = stats.metric(which) if weighted else None
        _install_fit(attn, which, heads, gram=stats.gram[which], metric=metric)
    if not attn.config.qk_norm:
        return
    # qk_norm (scalar only): new pre-norm component c' mirrors sum_c (HLC E)[c, c'] n(x W_c) with n(x W_c) ~= x W_c / rms_c.
    keep_k = factors.top_eigenvectors(stats.gram["k"][0], heads)
    rms = (stats.component_sq / stats.count).sqrt().cpu()
    scaled = factors.component_rows(attn, "k") / rms[:, None, None]
    mix = attn.hlc_k.detach().double().cpu() @ keep_k  # (old h', new h')
    _install(attn, "k", (mix.t() @ scaled.reshape(len(rms), -1)).reshape(heads, attn.head_dim, -1), keep_k.t())


def fit_key_hlc(attn, normed_batches) -> None:
    """Least-squares HLC_k (h', h): composing the layer's current (normalised) component keys best matches the
    target virtual keys; `normed_batches` yields (normed hidden states, target keys). Used for qk_norm layers."""
    components_gram, cross = 0.0, 0.0
    for normed, target in normed_batches:
        keys = attn.k_norm(attn.k_proj(normed).view(*normed.shape[:-1], -1, attn.head_dim)).double()
        flat_components = keys.transpose(-1, -2).reshape(-1, keys.shape[-2])
        flat_target = target.double().transpose(-1, -2).reshape(-1, target.shape[-2])
        components_gram = components_gram + flat_components.t() @ flat_components
        cross = cross + flat_components.t() @ flat_target
    eye = torch.eye(components_gram.shape[0], dtype=torch.float64, device=components_gram.device)
    ridge = 1e-10 * components_gram.diagonal().mean() * eye
    hlc = torch.linalg.solve(components_gram + ridge, cross)
    with torch.no_grad():
        attn.hlc_k.copy_(hlc.to(attn.hlc_k))


def _layer_inputs(model, blocks: torch.Tensor, batch_size: int = CALIB_BATCH):
    """Embeddings of `blocks` in batches, with the position embeddings and causal mask the decoder layers need."""
    inner = model.model
    device = next(model.parameters()).device
    for start in range(0, blocks.shape[0], batch_size):
        batch = blocks[start : start + batch_size].to(device)
        hidden = inner.embed_tokens(batch)
        position_ids = torch.arange(batch.shape[1], device=device)[None]
        mask = create_causal_mask(model.config, hidden, None, None, position_ids=position_ids)
        yield hidden, {"attention_mask": mask, "position_ids": position_ids,
                       "position_embeddings": inner.rotary_emb(hidden, position_ids=position_ids)}  # fmt: skip


def _check_blocks(blocks, vocab_size: int) -> torch.Tensor:
    if blocks is None or not isinstance(blocks, torch.Tensor) or blocks.dim() != 2 or blocks.numel() == 0:
        raise ValueError(
            "method='calib' needs calib_blocks: a non-empty LongTensor (n_blocks, block_size) of token ids."
        )
    if blocks.min() < 0 or blocks.max() >= vocab_size:
        raise ValueError(f"calib_blocks hold token ids outside the model's vocabulary (0-{vocab_size - 1}).")
    return blocks.long()


def _fitting_rows(length: int, device, stride: int = CALIB_QUERY_STRIDE, offset: int = 0) -> torch.Tensor:
    """The positions whose attention output calib fits: every `stride`-th, ending `offset` before the last."""
    return torch.arange(length - 1 - offset, -1, -stride, device=device).flip(0)


def _fitting_inputs(
    attn, normed: torch.Tensor, extras: dict, stride: int = CALIB_QUERY_STRIDE, offset: int = 0
) -> tuple[torch.Tensor, dict]:
    """(normed, extras) for fitting one layer: keys and values cover every position; queries only the rows of
    `_fitting_rows` (`extras["query_inputs"]`: those rows of the normed input and of the RoPE tables), with
    those rows of the causal mask (spelled out where SDPA would have used its implicit one)."""
    length = normed.shape[1]
    rows = _fitting_rows(length, normed.device, stride, offset)
    cos, sin = extras["position_embeddings"]
    mask = extras["attention_mask"]
    if mask is None:
        mask = torch.ones(length, length, dtype=torch.bool, device=normed.device).tril()[None, None]
    query_inputs = (normed[:, rows], (cos[:, rows], sin[:, rows]))
    return normed, {**extras, "query_inputs": query_inputs, "attention_mask": mask[..., rows, :]}


def _attention_output(attn, normed: torch.Tensor, extras: dict) -> torch.Tensor:
    """The attention sub-layer output (before the residual add): at the fitted rows for inputs from `_fitting_inputs`,
    at every position for a layer's plain (normed, extras)."""
    queries = attn.project_queries(*extras.get("query_inputs", (normed, extras["position_embeddings"])))
    keys, values = attn.project_components(normed, extras["position_embeddings"])
    return attn.attend(queries, keys, values, extras["attention_mask"], None)[0]


def attention_output_error(attn, inputs, targets) -> float:
    """Sum of squared differences between `attn`'s outputs on `inputs` [(normed, extras)] and `targets`."""
    return _outputs_and_error(attn, inputs, targets)[1]


def _outputs_and_error(attn, inputs, targets) -> tuple[list[torch.Tensor], float]:
    """`attn`'s outputs on `inputs`, and `attention_output_error`."""
    outputs = [_attention_output(attn, normed, extras) for normed, extras in inputs]
    return outputs, _squared_error(outputs, targets)


def _squared_error(outputs, targets) -> float:
    """Sum of squared differences between the tensors of `outputs` and `targets`, in float64."""
    return sum((output.double() - target.double()).pow(2).sum().item()
               for output, target in zip(outputs, targets, strict=True))  # fmt: skip


def _refined_tensors(attn, q_scale: float) -> list[tuple[nn.Parameter, float]]:
    """What calib's Adam steps move, each with its step-size scale: the new k/v projections and HLC (1), and the
    layer's q projection (`q_scale`: it adapts to the compressed keys; measured on SmolLM2-135M banded 3 -> 1 with
    q and o at the full step: +22.1% bits/byte against +24.2% for fixed q/o), and o_proj (`q_scale`) unless the
    composition refits it in closed form after the steps (`CALIB_OUTPUT_REFIT`)."""
    new = [*attn.k_proj.parameters(), *attn.v_proj.parameters(), attn.hlc_k, attn.hlc_v]
    adapting = [*attn.q_proj.parameters()]
    if not CALIB_OUTPUT_REFIT[attn.config.composition]:
        adapting += attn.o_proj.parameters()
    return [(tensor, 1.0) for tensor in new] + [(tensor, q_scale) for tensor in adapting]


def _refit_output_projection(attn, inputs, targets) -> tuple[list[torch.Tensor], float]:
    """Refit o_proj by ridge regression, pulled towards its current weights: given everything before it, the layer's
    output is linear in o_proj, so the best o_proj over `inputs` [(normed, extras)] and `targets` is one solve of a
    (H*d) x (H*d) system. The pull, `CALIB_OUTPUT_RIDGE` times the mean diagonal of the inputs' Gram matrix, keeps it
    from fitting the calibration text's noise; it cannot raise the error (the current weights are a candidate).
    Each batch's Gram and cross products are float32 (half the time of float64), summed and solved in float64.
    Returns the new outputs and `attention_output_error`."""
    projection = attn.o_proj
    attn.o_proj = nn.Identity()  # the attention outputs are then o_proj's inputs
    try:
        heads = [_attention_output(attn, normed, extras) for normed, extras in inputs]
    finally:
        attn.o_proj = projection
    with_bias = projection.bias is not None
    current = projection.weight.detach().double().t()  # (H*d, hidden)
    if with_bias:
        current = torch.cat([current, projection.bias.detach().double()[None]])
    gram = torch.zeros(current.shape[0], current.shape[0], dtype=torch.float64, device=current.device)
    cross = torch.zeros_like(current)
    for head, target in zip(heads, targets, strict=True):
        rows = head.reshape(-1, head.shape[-1]).float()
        if with_bias:
            rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
        gram += rows.t() @ rows
        cross += rows.t() @ target.reshape(-1, target.shape[-1]).float()
    pull = CALIB_OUTPUT_RIDGE * gram.diagonal().mean()
    solution = torch.linalg.solve(gram + pull * torch.eye(len(gram), dtype=gram.dtype, device=gram.device),
                                  cross + pull * current)  # fmt: skip
    with torch.no_grad():
        projection.weight.copy_(solution[: projection.in_features].t())
        if with_bias:
            projection.bias.copy_(solution[-1])
    outputs = [projection(head) for head in heads]
    return outputs, _squared_error(outputs, targets)


def _pca_start(attn, heads: int, inputs, stats: _LayerStats, weighted: bool = False) -> None:
    """Install the PCA-of-real-keys/values start (qk_norm keys: normalised mix + least-squares HLC)."""
    key_targets = [virtual_keys_values(attn, normed)[0] for normed, _ in inputs] if attn.config.qk_norm else None
    _install_pca(attn, heads, stats, weighted)
    if attn.config.qk_norm:
        fit_key_hlc(attn, [(normed, keys) for (normed, _), keys in zip(inputs, key_targets, strict=True)])


def _step_scale(tensor: torch.Tensor, value_maps: bool) -> float:
    """Adam's step size for `tensor`, before calib's `lr`: its RMS; for d x d value maps (banded `hlc_v`), also divided
    by sqrt(d), since a same-signed step on all d inputs of a map moves its output ~sqrt(d) times as much as one
    scalar."""
    scale = tensor.detach().float().pow(2).mean().sqrt().item()
    return scale / tensor.shape[-1] ** 0.5 if value_maps else scale


def _load(tensors: list[torch.Tensor], values: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for tensor, value in zip(tensors, values, strict=True):
            tensor.copy_(value)


def _fitting_sets(
    layer, batches, originals, original_outputs, stride: int, step_batches: int
) -> tuple[tuple[list, list], list]:
    """What calib fits one layer to, for `attention_output_error`: (every block at every position, as one (inputs,
    targets) pair; per group of `step_batches` batches, one (inputs, targets) pair per row offset (0 .. stride-1),
    together every block and position once).
    The target is what the original model's residual stream holds after this attention sub-layer, minus the current
    residual: the original layer's output on the original model's hidden states (`originals`, `original_outputs`)
    plus the drift the compressed layers before it caused, which this layer then corrects where it can."""
    attn, inputs, targets = layer.self_attn, [], []
    for (hidden, extras), uncompressed, original_output in zip(batches, originals, original_outputs, strict=True):
        inputs.append((layer.input_layernorm(hidden), extras))
        targets.append(uncompressed + original_output - hidden)
    groups = []
    for group in range(0, len(batches), step_batches):
        group_sets = []
        for offset in range(min(stride, batches[0][0].shape[1])):
            rows = _fitting_rows(batches[0][0].shape[1], batches[0][0].device, stride, offset)
            group_sets.append(([_fitting_inputs(attn, normed, extras, stride, offset)
                                for normed, extras in inputs[group : group + step_batches]],
                               [target[:, rows] for target in targets[group : group + step_batches]]))  # fmt: skip
        groups.append(group_sets)
    return (inputs, targets), groups


def _refine(attn, sets, every_position, options: CalibOptions, start: tuple[list, float]) -> tuple[list, float]:
    """`options.steps` Adam steps on `_refined_tensors` against the original attention output, step t on the rows of
    `sets[t % len(sets)]`, step sizes decayed from `options.lr` (times `_step_scale` and the tensor's scale) to 0 on a
    cosine, then (`CALIB_OUTPUT_REFIT`) o_proj refit on `every_position` (inputs, targets). The result is kept
    if its error there is below the start's (`start`: its outputs there and error), else the start is restored.
    Returns the outputs and error of what is kept."""
    steps = options.steps
    tensors, scales = zip(*_refined_tensors(attn, options.q_scale), strict=True)
    refit = CALIB_OUTPUT_REFIT[attn.config.composition]
    changed = [*tensors, *attn.o_proj.parameters()] if refit else tensors
    start_values = [t.detach().clone() for t in changed]
    frozen = [p for p in attn.parameters() if p.requires_grad and all(p is not t for t in tensors)]
    for parameter in frozen:
        parameter.requires_grad_(False)
    value_maps = attn.hlc_v.dim() == 4
    peaks = [options.lr * scale * _step_scale(t, value_maps and t is attn.hlc_v)
             for t, scale in zip(tensors, scales, strict=True)]  # fmt: skip
    groups = [{"params": [t], "lr": peak} for t, peak in zip(tensors, peaks, strict=True)]
    optimizer = torch.optim.Adam(groups, fused=tensors[0].device.type in ("cpu", "cuda"))
    with torch.enable_grad():
        for step in range(steps):
            for group, peak in zip(optimizer.param_groups, peaks, strict=True):
                group["lr"] = peak * 0.5 * (1 + math.cos(math.pi * step / steps))
            optimizer.zero_grad()
            inputs, targets = sets[step % len(sets)]
            for (normed, extras), target in zip(inputs, targets, strict=True):
                (_attention_output(attn, normed, extras).float() - target.float()).pow(2).sum().backward()
            optimizer.step()
    for tensor in tensors:
        tensor.grad = None
    for parameter in frozen:
        parameter.requires_grad_(True)
    finish = _refit_output_projection if refit else _outputs_and_error
    outputs, error = finish(attn, *every_position)
    if not error < start[1]:  # also undoes a diverged (NaN) refinement
        _load(changed, start_values)
        return start
    return outputs, error


def _calibrate_layer(
    layer, heads: int, batches, originals, original_outputs, options: CalibOptions, step_batches: int
) -> tuple[float, float, list[torch.Tensor]]:
    """Compress one layer by calibration (module docstring): the best start of svd, PCA and (banded) metric-weighted
    PCA (judged on the first set's rows), then refinement, against the targets of `_fitting_sets`. Returns the
    attention-output mean squared error over all positions and blocks at the start and at the end, and the compressed
    layer's attention outputs on `batches`."""
    attn = layer.self_attn
    if options.q_scale is None:
        options = replace(options, q_scale=calib_q_scale_for(heads, attn.num_kv_heads))
    every_position, groups = _fitting_sets(
        layer, batches, originals, original_outputs, options.query_stride, step_batches
    )
    sets = [fitting_set for group in groups for fitting_set in group]  # the steps' order: offsets vary fastest
    inputs = sets[0][0]  # the sets of one group hold the same normed inputs (keys and values of all positions)
    stats = _LayerStats(attn)
    for normed, _ in every_position[0]:
        stats.add(normed)
    starts = [lambda: _pca_start(attn, heads, inputs, stats)]
    if not attn.config.qk_norm:
        starts.append(lambda: _compress_layer_svd(attn, heads))
    if attn.config.composition == "banded":
        starts.append(lambda: _pca_start(attn, heads, inputs, stats, weighted=True))
    names = ("k_proj", "v_proj", "hlc_k", "hlc_v")
    original, best, best_error = {name: getattr(attn, name) for name in names}, None, float("inf")
    for start in starts:
        for name, module in original.items():
            setattr(attn, name, module)
        start()
        error = attention_output_error(attn, *sets[0])
        if error < best_error:
            best, best_error = {name: getattr(attn, name) for name in names}, error
    for name, module in best.items():
        setattr(attn, name, module)
    size = sum(target.numel() for target in every_position[1])
    start = _outputs_and_error(attn, *every_position)
    outputs, end_error = _refine(attn, sets, every_position, options, start) if options.steps else start
    return start[1] / size, end_error / size, outputs


def _compress_calib(
    model, targets: dict[int, int], blocks: torch.Tensor, options: CalibOptions, progress: bool
) -> None:
    """Layer by layer, on the hidden states produced by the already-compressed earlier layers, next to those of the
    original model (the targets, `_calibrate_layer`); a progress bar shows each compressed layer's attention-output
    MSE after refinement and at its start."""
    from tqdm.auto import tqdm

    batch_size = min(CALIB_BATCH, options.step_blocks)
    step_batches = options.step_blocks // batch_size
    batches = list(_layer_inputs(model, blocks, batch_size))
    layers = model.model.layers[: max(targets) + 1]
    bar = tqdm(total=len(layers), desc="calib layers", unit="layer", disable=not progress)
    for index, layer, originals, original_outputs in _original_walk(layers, batches):
        if index in targets and targets[index] < layer.self_attn.num_component_heads:
            start, end, outputs = _calibrate_layer(
                layer, targets[index], batches, originals, original_outputs, options, step_batches
            )
            _set_heads(model, index, targets[index])
            bar.set_postfix(layer=index, mse=f"{end:.3g}", start=f"{start:.3g}", ratio=f"{end / start:.2f}")
            batches = [(layer.after_attention(hidden, output), extras)
                       for (hidden, extras), output in zip(batches, outputs, strict=True)]  # fmt: skip
        else:
            batches = [(layer(hidden, **extras), extras) for hidden, extras in batches]
        bar.update(1)
    bar.close()


def _original_walk(layers, batches):
    """For each of `layers` in turn: (index, layer, the uncompressed model's hidden states entering it, its attention
    outputs on them), starting from the hidden states of `batches` ((hidden, extras) pairs, the extras kept). The
    layer's attention may be changed before the next item is asked for: the walk carries what it computed before."""
    originals = [hidden for hidden, _ in batches]
    for index, layer in enumerate(layers):
        outputs = [_attention_output(layer.self_attn, layer.input_layernorm(hidden), extras)
                   for hidden, (_, extras) in zip(originals, batches, strict=True)]  # fmt: skip
        yield index, layer, originals, outputs
        originals = [layer.after_attention(hidden, output) for hidden, output in zip(originals, outputs, strict=True)]


def _calibrate_each_alone(model, targets: dict[int, int], blocks: torch.Tensor, options: CalibOptions):
    """`each_layer_compressed_alone` for calib: one pass over `blocks` through the original layers; at each target
    layer, a copy of the model gets that layer calibrated on the original hidden states there."""
    batch_size = min(CALIB_BATCH, options.step_blocks)
    batches = list(_layer_inputs(model, blocks, batch_size))
    for index, _, originals, original_outputs in _original_walk(model.model.layers[: max(targets) + 1], batches):
        if index in targets:
            trial = copy.deepcopy(model)
            inputs = [(hidden, extras) for hidden, (_, extras) in zip(originals, batches, strict=True)]
            _calibrate_layer(trial.model.layers[index], targets[index], inputs, originals, original_outputs, options,
                             options.step_blocks // batch_size)  # fmt: skip
            _set_heads(trial, index, targets[index])
            yield index, trial


@torch.no_grad()
def each_layer_compressed_alone(model, num_component_heads: int, layers=None, method: str = "svd", calib_blocks=None):
    """Yield (index, a copy of `model` with only that layer reduced to `num_component_heads` by `method`) for each of
    `layers` (None: all) that caches more heads; `model` is left unchanged. Each copy is what `reduce_kv_heads(
    copy.deepcopy(model), num_component_heads, layers=[index], method=method, calib_blocks=calib_blocks)` returns, but
    calib makes them all in one pass over `calib_blocks`, carrying the original hidden states from layer to layer
    instead of running every earlier layer again for each one (`layer_sensitivity` of SmolLM2's 30 layers)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
    current = model.config.component_heads_per_layer
    targets = {index: heads for index, heads in _targets(model.config, num_component_heads, layers).items()
               if heads < current[index]}  # fmt: skip
    if not targets:
        return
    if method == "svd":
        for index in targets:
            yield index, reduce_kv_heads(copy.deepcopy(model), num_component_heads, layers=[index], method="svd")
        return
    blocks = _check_blocks(calib_blocks, model.config.vocab_size)
    work = copy.deepcopy(model).eval()
    _enable_hlc(work)
    yield from _calibrate_each_alone(work, targets, blocks, CalibOptions().for_composition(work.config.composition))


def _set_heads(model, layer: int, heads: int) -> None:
    model.model.layers[layer].self_attn.num_component_heads = heads
    per_layer = model.config.component_heads_per_layer
    per_layer[layer] = heads
    model.config.num_component_heads = per_layer[0] if len(set(per_layer)) == 1 else per_layer


@torch.no_grad()
def reduce_kv_heads(
    model, num_component_heads, layers=None, method: str = "svd", calib_blocks=None, calib_steps: int | None = None,
    progress: bool = False, composition: str | None = None, calib_query_stride: int = CALIB_QUERY_STRIDE,
    calib_step_blocks: int | None = None, calib_lr: float = CALIB_LR, calib_q_scale: float | None = None,
    sharpen: float = 1.0,
):
    """Reduce the cached KV heads of an MEAForCausalLM in place and return it.

    num_component_heads: the new h' (1..num_key_value_heads) for every layer in `layers` (None = all layers), or a
    list with one h' per layer. method: "svd" (data-free, the paper's construction) or "calib" (needs
    `calib_blocks`, a LongTensor (n_blocks, block_size) of token ids, and runs `calib_steps` refinement steps per
    layer from a peak step size `calib_lr` (`calib_q_scale` times that for the q projection, and o_proj in scalar
    layers; None: `calib_q_scale_for` each layer's cut), each comparing
    outputs at every `calib_query_stride`-th position of at most `calib_step_blocks` blocks (these two, when None,
    by composition: `CALIB_STEPS`, `CALIB_STEP_BLOCKS`); `progress` shows a per-layer bar with the error).
    `composition="banded"` first rewrites a scalar-HLC model in banded form
    (exactly), so the reduced layers get per-RoPE-pair key weights and d x d value maps. `sharpen` multiplies
    the attention logits of every layer that now caches fewer heads (`temperature.py`; 1: unchanged). Layers not
    named keep their heads and weights; a named layer whose h' is unchanged is rewritten exactly (svd) or left as
    it is (calib).
    """
    if getattr(model.config, "model_type", None) != "mea":
        raise ValueError(
            f"reduce_kv_heads needs an MEA model, got model_type {model.config.model_type!r}; convert first."
        )
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
    targets = _targets(model.config, num_component_heads, layers)
    if method == "calib":
        calib_blocks = _check_blocks(calib_blocks, model.config.vocab_size)
        options = CalibOptions(calib_steps, calib_query_stride, calib_step_blocks, calib_lr, calib_q_scale)
    if method == "svd":
        _refuse_svd_qk_norm(model.config, targets)
    check_sharpen(sharpen)
    check_composition(model.config, composition)
    heads_before = {index: model.model.layers[index].self_attn.num_component_heads for index in targets}
    was_training = model.training
    model.eval()
    _enable_hlc(model)
    _use_composition(model, composition)
    if method == "svd":
        for index, heads in targets.items():
            _compress_layer_svd(model.model.layers[index].self_attn, heads)
            _set_heads(model, index, heads)
    else:
        _compress_calib(model, targets, calib_blocks, options.for_composition(model.config.composition), progress)
    if sharpen != 1.0:
        compressed = [index for index in targets
                      if model.model.layers[index].self_attn.num_component_heads < heads_before[index]]  # fmt: skip
        sharpen_layers(model, sharpen, compressed)
    model.train(was_training)
    return model


__all__ = [
    "CALIB_BLOCKS",
    "CALIB_LR",
    "CALIB_QUERY_STRIDE",
    "CALIB_Q_SCALE_HARSH",
    "CALIB_Q_SCALE_MILD",
    "CALIB_STEPS",
    "CALIB_STEP_BLOCKS",
    "METHODS",
    "attention_output_error",
    "calib_blocks_for",
    "calib_q_scale_for",
    "check_composition",
    "each_layer_compressed_alone",
    "effective_projection",
    "parse_layers",
    "reduce_kv_heads",
    "virtual_keys_values",
]


def describe_compression(source_name: str, method: str, kv_heads: int, layers, config, sharpen: float = 1.0) -> str:
    """Model-card provenance line of a compressed model (`config` is the compressed model's)."""
    from ..memory import kv_fraction

    where = "all layers" if layers is None else f"layers {', '.join(map(str, layers))}"
    sharpened = ""
    if sharpen != 1.0:
        sharpened = f"The compressed layers' attention logits were multiplied by {sharpen:g} (`--sharpen`). "
    return (
        f"Compressed from `{source_name}` with `mea compress --method {method}` ({config.composition} composition): "
        f"{where} reduced to {kv_heads} cached KV component heads (of {config.num_key_value_heads}); the KV cache is {100 * kv_fraction(config):.1f}% of "
        f"the uncompressed model's. {sharpened}"
        "Continue training (`mea train --init-from FOLDER`) to recover the loss."
    )
