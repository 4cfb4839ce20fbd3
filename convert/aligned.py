"""`--method aligned`: merge heads after aligning them, with the alignment folded into q and o.

Notation: weights are nn.Linear's (out, in), augmented with their bias as a last column, so a
head's output is y = x̃ W̃ᵀ with x̃ = [x, 1]. C = E[x̃ x̃ᵀ] is the layer's calibration moment.

Keys. RoPE rotates each frequency pair (i, i + R/2) of a head (R rotary dims, HF's rotate_half
layout) as a complex number. Multiplying a pair by any complex c commutes with the rotation, so
key head j may be replaced by c_j·k' if the pair of every query head reading j is multiplied by
conj(c_j): the logits are unchanged. Per pair, the best shared key k' and the c_j solve a rank-1
complex approximation of the members' keys, weighted by how strongly the queries read each pair
(their rotation-averaged second moment): the top eigenvector of a small Hermitian Gram matrix.
Dimensions outside the rotary part (every dimension, in a layer without RoPE) admit any linear map
and are merged like values.

Values. Any linear map M_j on value head j folds into the o_proj columns of the query heads that
read it. The shared value v' and the M_j minimise Σ_j ‖(v_j − v' M_j) L_j‖² over the calibration
inputs, where L_j² = Σ_h O_hᵀ O_h weights errors by what o_proj makes of them: a reduced-rank
regression, solved exactly by the top eigenvectors of the stacked outputs' covariance.

Both are exact when the merged heads are copies of each other (or a group has one head), and
least-squares optimal on the calibration data otherwise. Families that normalise q or k after the
projection (Qwen3, OLMo-2, OLMoE, Gemma-3, StableLM or Phi with q/k LayerNorm) cannot take a key
transform through the norm, so their keys are mean-pooled; their values are still aligned. What a model
does to q·k afterwards (Gemma-2's logit soft-capping and query_pre_attn_scalar) leaves the key transform exact.
"""

from __future__ import annotations

import torch

from gqa.convert.families import Family, Geometry
from gqa.convert.heads import merge_per_head, merge_stacked_rows

EPS = 1e-10


def _augmented(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    bias = torch.zeros(weight.shape[0], dtype=weight.dtype) if bias is None else bias
    return torch.cat([weight, bias[:, None]], dim=1).double()


def _psd_sqrt(matrix: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(matrix)
    values = values.clamp_min(values.max().clamp_min(EPS) * 1e-8)
    power = -0.5 if inverse else 0.5
    return (vectors * values.pow(power)) @ vectors.T


def reduced_rank_merge(
    weights: list[torch.Tensor], output_metrics: list[torch.Tensor], moment: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Heads y_j = x̃ W_jᵀ (each d x n) -> one head y' = x̃ W'ᵀ and maps M_j with y_j ≈ y' M_j,
    minimising Σ_j E‖(y_j − y' M_j) L_j‖² for L_j = output_metrics[j]."""
    d = weights[0].shape[0]
    stacked = torch.cat([w.T @ metric for w, metric in zip(weights, output_metrics)], dim=1)  # n x (r d)
    gram = stacked.T @ moment @ stacked
    _, vectors = torch.linalg.eigh((gram + gram.T) / 2)
    top = vectors[:, -d:]  # the d directions the stacked outputs use most
    merged = (stacked @ top).T
    maps = [
        top[j * d : (j + 1) * d].T @ torch.linalg.pinv(metric, hermitian=True)
        for j, metric in enumerate(output_metrics)
    ]
    return merged, maps


def rank1_complex_merge(
    rows: torch.Tensor, weights: torch.Tensor, moments: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per rotary pair p: member keys κ_j = x̃ · rows[p, j] (complex) -> one key κ' = x̃ · w[p] and
    complex scales c[p, j] with κ_j ≈ c_j κ', minimising Σ_j weights[p, j] E_p|κ_j − c_j κ'|², the
    expectation under moments[p]."""
    root = weights.clamp_min(EPS).sqrt()  # P x r
    scaled = rows * root[..., None]  # P x r x n
    gram = torch.einsum("pan,pnm,pbm->pab", scaled.conj(), moments.to(scaled.dtype), scaled)
    _, vectors = torch.linalg.eigh(gram)
    top = vectors[..., -1]  # P x r, unit norm
    merged = torch.einsum("pj,pjn->pn", top, scaled)
    scales = top.conj() / root
    return merged, scales


def key_moments(moment: torch.Tensor, frequencies: torch.Tensor, context: int) -> torch.Tensor:
    """Per rotary pair, the moment that matters for keys. Softmax ignores a logit shift shared by
    all keys, so the part of the mean key that the rotation leaves (nearly) unchanged over the
    context carries no information: it is discounted by |E_Δ e^{iθΔ}|², the squared mean phase over
    relative positions Δ < context. High frequencies keep the full second moment."""
    mean = moment[:, -1]  # E[x̃], since x̃ ends in a constant 1
    covariance = moment - torch.outer(mean, mean)
    angles = torch.arange(context, dtype=torch.float64)[None, :] * frequencies.double()[:, None]
    kept = 1 - angles.cos().mean(1) ** 2 - angles.sin().mean(1) ** 2
    return covariance + kept[:, None, None] * torch.outer(mean, mean)


def _queries_of(kv_head: int, geometry: Geometry) -> range:
    per_kv = geometry.heads // geometry.kv_heads
    return range(kv_head * per_kv, (kv_head + 1) * per_kv)


def split_qkvo(tensors: dict[str, torch.Tensor], family: Family, geometry: Geometry) -> dict[str, torch.Tensor]:
    """Augmented per-projection matrices: q (H d x n+1), k and v (KV d x n+1), o (hidden x H d)."""
    d, kv = geometry.head_dim, geometry.kv_heads
    if family.fused_qkv:
        sizes = [geometry.heads * d, kv * d, kv * d]
        bias = tensors.get(_fused_bias(family))  # GPT-2's c_attn has one; Phi-3's qkv_proj has none
        biases = bias.split(sizes) if bias is not None else (None, None, None)
        parts = {p: _augmented(w, b) for p, w, b in zip("qkv", tensors[family.fused_qkv[0]].split(sizes), biases)}
    else:
        parts = {p: _augmented(tensors[f"{m}.weight"], tensors.get(f"{m}.bias")) for p, m in zip("qkv", family.projections)}
    parts["o"] = tensors[family.o_proj].double()
    return parts


def join_qkvo(
    parts: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], family: Family
) -> dict[str, torch.Tensor]:
    """Write merged matrices back under the source's tensor names, in float32 (the writer casts once,
    to the output dtype)."""
    out: dict[str, torch.Tensor] = {}
    if family.fused_qkv:
        out[family.fused_qkv[0]] = torch.cat([parts[p][:, :-1] for p in "qkv"]).float()
        if _fused_bias(family) in tensors:
            out[_fused_bias(family)] = torch.cat([parts[p][:, -1] for p in "qkv"]).float()
    else:
        for p, module in zip("qkv", family.projections):
            out[f"{module}.weight"] = parts[p][:, :-1].float()
            if f"{module}.bias" in tensors:
                out[f"{module}.bias"] = parts[p][:, -1].float()
    out[family.o_proj] = parts["o"].float()
    return out


def _fused_bias(family: Family) -> str:
    return family.fused_qkv[0].removesuffix(".weight") + ".bias"


def _heads(matrix: torch.Tensor, d: int) -> list[torch.Tensor]:
    return list(matrix.reshape(-1, d, matrix.shape[-1]))


def aligned_merge(
    tensors: dict[str, torch.Tensor],
    family: Family,
    geometry: Geometry,
    groups: list[list[int]],
    moment: torch.Tensor,
    frequencies: torch.Tensor | None = None,
    context: int = 4096,
) -> dict[str, torch.Tensor]:
    """Merge one layer's attention (all its tensors, relative names) with aligned heads.
    `frequencies` are the rotary angles per pair (inv_freq); without them keys use the full moment."""
    d = geometry.head_dim
    parts = split_qkvo(tensors, family, geometry)
    heads = {p: _heads(parts[p], d) for p in "qkv"}
    heads["o"] = list(parts["o"].reshape(parts["o"].shape[0], -1, d).permute(1, 0, 2))  # H x hidden x d
    align_keys = not family.has_qk_norm(tensors)  # a q/k norm after the projection would see a key transform
    pair_moments = None
    if align_keys and geometry.rotary_dims:
        half = geometry.rotary_dims // 2
        pair_moments = key_moments(moment, frequencies, context) if frequencies is not None else moment.expand(half, -1, -1)
    new_k, new_v = [], []
    for members in groups:
        new_v.append(_merge_values(heads, members, geometry, moment))
        if align_keys:
            new_k.append(_merge_keys(heads, members, geometry, moment, pair_moments))
        else:
            new_k.append(torch.stack([heads["k"][j] for j in members]).mean(0))

    merged = {
        "q": torch.cat(heads["q"]),
        "k": torch.cat(new_k),
        "v": torch.cat(new_v),
        "o": torch.stack(heads["o"]).permute(1, 0, 2).reshape(parts["o"].shape),
    }
    out = dict(tensors)
    out.update(join_qkvo(merged, tensors, family))
    # Norms that belong to KV heads (OLMo-2's k_norm segments, StableLM's per-head k norms) follow the
    # keys, which are mean-pooled in exactly those families.
    kv = geometry.kv_heads
    for rel in family.kv_stacked:
        if family.role(rel) == "norm" and rel in tensors:
            out[rel] = merge_stacked_rows(tensors[rel], kv, groups, "mean", "norm")
    for pattern in family.kv_per_head:
        merge_per_head(out, pattern, kv, groups, "mean", family.role(pattern))
    return out


def _merge_values(heads: dict[str, list], members: list[int], geometry: Geometry, moment) -> torch.Tensor:
    """One group's shared value head, weighted by what o_proj makes of each; the maps go into o_proj."""
    o_heads = heads["o"]
    metrics = [_psd_sqrt(sum(o_heads[h].T @ o_heads[h] for h in _queries_of(j, geometry))) for j in members]
    merged, maps = reduced_rank_merge([heads["v"][j] for j in members], metrics, moment)
    for j, value_map in zip(members, maps):
        for h in _queries_of(j, geometry):
            o_heads[h] = o_heads[h] @ value_map.T
    return merged


def _merge_keys(heads: dict[str, list], members: list[int], geometry: Geometry, moment, pair_moments) -> torch.Tensor:
    """One group's shared key head; the per-head transforms go into the queries that read it."""
    q_heads, k_heads = heads["q"], heads["k"]
    d, rot = geometry.head_dim, geometry.rotary_dims
    half = rot // 2
    merged_k = torch.empty_like(k_heads[members[0]])
    if half:
        # Rotary part: complex pairs (i, i + R/2); weights = rotation-averaged query energy per pair.
        rows = torch.stack([torch.complex(k_heads[j][:half], k_heads[j][half:rot]) for j in members], dim=1)
        energy = torch.stack(
            [
                sum(
                    torch.einsum("pn,nm,pm->p", q_heads[h][:rot], moment, q_heads[h][:rot]).reshape(2, half).sum(0)
                    for h in _queries_of(j, geometry)
                )
                for j in members
            ],
            dim=1,
        )
        merged_pairs, scales = rank1_complex_merge(rows, energy, pair_moments)
        merged_k[:half], merged_k[half:rot] = merged_pairs.real, merged_pairs.imag
        for idx, j in enumerate(members):
            conj = scales[:, idx].conj()[:, None]
            for h in _queries_of(j, geometry):
                z = conj * torch.complex(q_heads[h][:half], q_heads[h][half:rot])
                q_heads[h] = torch.cat([z.real, z.imag, q_heads[h][rot:]])
    if rot < d:
        # Unrotated dims: any linear map, weighted by the queries' second moment there.
        metrics = [
            _psd_sqrt(sum(q_heads[h][rot:] @ moment @ q_heads[h][rot:].T for h in _queries_of(j, geometry)))
            for j in members
        ]
        merged_k[rot:], key_maps = reduced_rank_merge([k_heads[j][rot:] for j in members], metrics, moment)
        for j, key_map in zip(members, key_maps):
            for h in _queries_of(j, geometry):
                q_heads[h] = torch.cat([q_heads[h][:rot], key_map @ q_heads[h][rot:]])
    return merged_k
