"""Factoring a layer's h virtual key/value heads into h' components and an HLC, for each HLC form (docs/design.md §4).

Every virtual head is affine in the normed hidden state x: head i = R_i [x; 1], with R_i (d, D+1) the sum over
components c of mixing[c, i]^T [W_c | b_c]. Keeping h' components means approximating the stacked R by a low-rank
product, in one of three *families*, each a batch of matrices X (n, m) whose n "head" rows get a shared basis:

- `scalar` (the paper's HLC, keys and values): X = the h heads as rows of d(D+1) numbers; rank h'.
- `band` (keys under `composition="banded"`): per RoPE pair j, X_j = the h heads' pair (j, j + d/2) read as one complex
  row (real part channel j, imaginary part channel j + d/2); rank h' per pair, with complex mixing weights.
- `map` (values under `composition="banded"`): X = all h*d value channels as rows; rank h'*d, i.e. a d x d map per
  (component, virtual head).

`fit` takes an orthonormal basis E (n, r) of the top eigenvectors of a Gram matrix G of the rows, in an optional
diagonal metric w (PCA of w^1/2 G w^1/2), and returns mixing U = w^-1/2 E and components E^H w^1/2 X, so that
U (E^H w^1/2 X) is the w-weighted projection of X. With G = X X^H (the weights' own Gram) this is the truncated SVD,
the data-free method; with G summed over real keys/values it is their PCA. RoPE multiplies pair j of every head by
the same unit complex number, so neither Gram depends on it. Everything is float64 on the CPU.
"""

import torch

from ..modeling_mea import as_maps

FAMILIES = ("scalar", "band", "map")


def family_of(attn, which: str) -> str:
    """The family that factors keys ("k") or values ("v") of `attn` under its config's `composition`."""
    if attn.config.composition == "scalar":
        return "scalar"
    return "band" if which == "k" else "map"


def component_rows(attn, which: str) -> torch.Tensor:
    """(h', d, D+1) float64: [W_c | b_c] of every component head of keys ("k") or values ("v")."""
    proj = attn.k_proj if which == "k" else attn.v_proj
    heads, head_dim = proj.out_features // attn.head_dim, attn.head_dim
    weight = proj.weight.detach().double().cpu().view(heads, head_dim, -1)
    bias = torch.zeros(heads, head_dim, dtype=torch.float64) if proj.bias is None else proj.bias.detach().double().cpu()
    return torch.cat([weight, bias.view(heads, head_dim, 1)], dim=2)


def mixing_maps(attn, which: str) -> torch.Tensor:
    """The layer's HLC of keys or values as float64 (h', h, d, d) maps (identity when the model has no HLC)."""
    mixing = attn.mixing()[0 if which == "k" else 1]
    eye = torch.eye(attn.head_dim, dtype=torch.float64)
    if mixing is None:
        return torch.eye(attn.num_kv_heads, dtype=torch.float64)[..., None, None] * eye
    mixing = mixing.detach().double().cpu()
    return as_maps(mixing, attn.head_dim) if mixing.dim() == 4 else mixing[..., None, None] * eye


def virtual_rows(attn, which: str) -> torch.Tensor:
    """(h, d, D+1) float64: R_i of every virtual head (module docstring)."""
    return torch.einsum("cijk,cjf->ikf", mixing_maps(attn, which), component_rows(attn, which))


def to_matrix(rows: torch.Tensor, family: str) -> torch.Tensor:
    """Virtual (or component) rows (h, d, D+1) as the family's batch of matrices (batch, n, m)."""
    heads, head_dim, inputs = rows.shape
    if family == "scalar":
        return rows.reshape(1, heads, -1)
    if family == "map":
        return rows.reshape(1, heads * head_dim, inputs)
    half = head_dim // 2
    return torch.complex(rows[:, :half], rows[:, half:]).permute(1, 0, 2)  # (d/2, h, D+1)


def from_matrix(matrix: torch.Tensor, family: str, head_dim: int) -> torch.Tensor:
    """Inverse of `to_matrix`: (batch, n, m) back to rows (heads, d, D+1)."""
    if family == "scalar":
        return matrix[0].reshape(matrix.shape[1], head_dim, -1)
    if family == "map":
        return matrix[0].reshape(-1, head_dim, matrix.shape[2])
    pairs = matrix.permute(1, 0, 2)  # (heads, d/2, D+1)
    return torch.cat([pairs.real, pairs.imag], dim=1)


def hlc_parameter(mixing: torch.Tensor, family: str, num_components: int, head_dim: int) -> torch.Tensor:
    """The model's HLC parameter from a fitted mixing U (batch, n, r) with rows = virtual heads, columns = components:
    (h', h) scalars, (h', h, 2, d/2) complex pair weights, or (h', h, d, d) maps (virtual = component @ map)."""
    if family == "scalar":
        return mixing[0].t()
    if family == "band":  # U_j[i, c] is the complex weight of component c in virtual head i, pair j
        weights = mixing.permute(2, 1, 0)  # (h', h, d/2)
        return torch.stack([weights.real, weights.imag], dim=2)
    heads = mixing.shape[1] // head_dim  # U[i*d + k, c*d + j] = map[c, i][j, k]
    return mixing[0].reshape(heads, head_dim, num_components, head_dim).permute(2, 0, 3, 1)


def rank_of(family: str, num_components: int, head_dim: int) -> int:
    return num_components * head_dim if family == "map" else num_components


def data_gram(heads: torch.Tensor, family: str) -> torch.Tensor:
    """(batch, n, n) Gram of real virtual heads (..., h, d) in the family's row space, summed over tokens."""
    heads = heads.double()
    if family == "scalar":
        flat = heads.transpose(-1, -2).reshape(-1, heads.shape[-2])
        return (flat.t() @ flat)[None]
    if family == "map":
        flat = heads.reshape(-1, heads.shape[-2] * heads.shape[-1])
        return (flat.t() @ flat)[None]
    half = heads.shape[-1] // 2
    pairs = torch.complex(heads[..., :half], heads[..., half:]).reshape(-1, heads.shape[-2], half)
    return torch.einsum("tij,tkj->jik", pairs, pairs.conj())


def weight_gram(matrix: torch.Tensor) -> torch.Tensor:
    """X X^H: with it, `fit` is the truncated SVD of X."""
    return matrix @ matrix.mH


def fit(matrix: torch.Tensor, gram: torch.Tensor, rank: int, metric: torch.Tensor | None = None):
    """(mixing U (batch, n, rank), components (batch, rank, m)) with U @ components the metric-weighted projection of
    `matrix` onto the top-`rank` eigenvectors of `gram` (module docstring). `metric`: (batch, n) positive weights."""
    scale = torch.ones(gram.shape[:-1], dtype=torch.float64) if metric is None else metric.double().sqrt()
    scale = scale / scale.mean(-1, keepdim=True)  # only relative weights within a batch entry matter
    basis = top_eigenvectors(gram * scale[..., :, None] * scale[..., None, :], rank)
    return basis / scale[..., :, None], basis.mH @ (scale[..., :, None] * matrix)


def top_eigenvectors(gram: torch.Tensor, rank: int) -> torch.Tensor:
    """(batch, n, rank) orthonormal eigenvectors of Hermitian (batch, n, n) matrices, largest eigenvalues first."""
    return torch.linalg.eigh(gram)[1].flip(-1)[..., :rank]
