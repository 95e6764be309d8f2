"""Reconstruction: refit the kept weights of each layer's output projections after slicing.

Slicing removes KV groups (columns of o_proj) and MLP channels (columns of down_proj) and
leaves the kept columns as they were, so every layer's output loses what the removed units
wrote into the residual stream. This stage refits, for o_proj and down_proj of every decoder
layer in order, the kept columns W_K by ridge least squares so that the slim projection
reproduces the dense layer's output on calibration activations:

    minimise ||W_K' X_K - Y||^2 + lambda ||W_K' - W_K||^2
    =>  W_K' = (Y X_K^T + lambda W_K) (X_K X_K^T + lambda I)^-1      (solved in float64)

with lambda = damp x mean diag(X_K X_K^T) (solved in float32 on a GPU: `work_dtype`). The ridge pulls toward the sliced weights rather
than toward zero, so a layer that loses nothing keeps its weights. X are the projection's
inputs on the *already pruned and refit* prefix (Týr-the-Pruner: statistics from the dense
prefix cost an order of magnitude in perplexity at 50%). Y (`target`) is either
- "prefix": the dense layer applied to those same inputs, Y = W Z; the kept inputs X_K are
  then rows of Z and the solution is W_K + W_P H_PK (H_KK + lambda I)^-1 (SlimGPT, ZipLM), or
- "dense": the dense model's own activations on its own stream (the refit also absorbs the
  drift the prefix has accumulated), which costs one more pass of the dense layer.

Selection (`select="local"`): SAAP's global ranking still decides how many units each layer
loses; which ones is chosen by greedy structured OBS on H = Z Z^T: remove, one unit at a time,
the unit B whose removal with the others refit costs least, tr(W_B (H^-1_BB)^-1 W_B^T), then
update W and H^-1 by the Schur complement (ZipLM's block OBS).

Memory: one decoder layer of each model is on the compute device at a time; the calibration
streams (hidden states [N, T, hidden] and the projections' inputs) are held on the CPU and
moved batch by batch. Gram matrices are accumulated in float64 on the device.
No library does sequential structured refits of a sliced LLaMA (llm-compressor's SparseGPT /
OBS modifiers refit unstructured masks of a dense-shaped model), so this is written here.
"""

from __future__ import annotations

import itertools
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from saap_edge.config import ReconstructSettings
from saap_edge.distributed import processes
from saap_edge.errors import UserError
from saap_edge.models.onednn import onednn_linears
from saap_edge.prune.groups import ATTN, MLP, MEMBERS, OUTPUT_PROJ, LayerShape, decoder_layers, discover, member_index, submodule
from saap_edge.prune.plan import LayerPlan, PrunePlan
from saap_edge.prune.slicing import fill_layer, kept_index, release_layer, take_lines
from saap_edge.memory import PeakRSS


# --------------------------------------------------------------------------------------------
# Refit and selection math: pure functions over float64 tensors.
# W: dense output projection [out, in]; G = sum x x^T over tokens [in, in];
# keep: kept input columns (LongTensor).

def ridge_lambda(gram_kk: torch.Tensor, damp: float) -> float:
    """lambda = damp x mean diagonal of the kept Gram block (1e-8 if every input is dead)."""
    mean_diag = float(gram_kk.diagonal().mean()) if gram_kk.numel() else 0.0
    return damp * mean_diag if mean_diag > 0 else 1e-8


def _spd_inverse(a: torch.Tensor) -> torch.Tensor:
    """a^-1 for a symmetric positive definite `a` (Cholesky inverse: half the work of solving
    against the identity; more damping if the factorisation fails)."""
    for attempt in range(4):
        chol, info = torch.linalg.cholesky_ex(a)
        if int(info) == 0:
            return torch.cholesky_inverse(chol)
        a = a + a.diagonal().mean() * 10.0 ** (attempt - 3) * torch.eye(len(a), dtype=a.dtype, device=a.device)
    return torch.linalg.pinv(a, hermitian=True)


def _spd_solve(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a^-1 b for a symmetric positive definite `a` (Cholesky; more damping if it fails)."""
    for attempt in range(4):
        chol, info = torch.linalg.cholesky_ex(a)
        if int(info) == 0:
            return torch.cholesky_solve(b, chol)
        a = a + a.diagonal().mean() * 10.0 ** (attempt - 3) * torch.eye(len(a), dtype=a.dtype, device=a.device)
    return torch.linalg.lstsq(a, b).solution


def refit(w: torch.Tensor, cross: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor, damp: float) -> torch.Tensor:
    """Ridge least-squares refit of the kept columns of `w` [out, in_dense].

    cross = sum z_target x^T [in_dense, in_dense] (x: the projection's full input on the pruned
    stream, z_target: the dense input whose W z is the target); gram = sum x x^T.
    Returns W_K' [out, |keep|] = (W cross[:, K] + lambda W_K) (G_KK + lambda I)^-1."""
    g_kk = gram[keep][:, keep]
    lam = ridge_lambda(g_kk, damp)
    w_k = w[:, keep]
    rhs = w @ cross[:, keep] + lam * w_k  # [out, K]
    eye = torch.eye(len(keep), dtype=gram.dtype, device=gram.device)
    return _spd_solve(g_kk + lam * eye, rhs.T).T


def target_energy(w: torch.Tensor, gram_target: torch.Tensor) -> float:
    """sum ||W z||^2 over the calibration tokens (the denominator of `output_error`)."""
    return float(torch.einsum("oi,ij,oj->", w, gram_target, w))


def output_error(w_k: torch.Tensor, w: torch.Tensor, cross: torch.Tensor, gram: torch.Tensor,
                 gram_target: torch.Tensor, keep: torch.Tensor, yy: float | None = None) -> float:
    """Relative squared error sum ||w_k x_K - W z||^2 / sum ||W z||^2 over the calibration tokens,
    from the accumulated second moments (no activations needed; `yy`: target_energy, when known)."""
    yy = target_energy(w, gram_target) if yy is None else yy
    fit = float(torch.einsum("ok,kl,ol->", w_k, gram[keep][:, keep], w_k))
    mixed = float(torch.einsum("ok,ik,oi->", w_k, cross[:, keep], w))
    return max(fit - 2 * mixed + yy, 0.0) / max(yy, 1e-30)


def obs_select(w: torch.Tensor, gram: torch.Tensor, width: int, n_remove: int, damp: float, steps: int = 16,
               families: torch.Tensor | None = None, quota: int | None = None) -> list[int]:
    """Greedy structured OBS: the `n_remove` units (blocks of `width` consecutive input
    columns) whose removal, with the remaining columns refit, costs least output error.

    Each step scores every remaining unit B by tr(W_B (H^-1_BB)^-1 W_B^T), removes the
    ceil(n_remove / steps) cheapest together and applies the optimal update for that block,
    W -= W_B (H^-1_BB)^-1 H^-1_B: and H^-1 -= H^-1_:B (H^-1_BB)^-1 H^-1_B: (Schur complement).
    steps >= n_remove is the exact one-at-a-time greedy of ZipLM; fewer steps trade a little
    of it for time (a 1536-channel MLP losing 1000 channels: 16 steps instead of 1000).
    `families` [n_units] with `quota`: no family loses more than `quota` units (query heads of
    one KV group: every kept group loses the same number)."""
    n_in = gram.shape[0]
    n_units = n_in // width
    lam = ridge_lambda(gram, damp)
    h = gram + lam * torch.eye(n_in, dtype=gram.dtype, device=gram.device)
    hinv = _spd_inverse(h)
    del h
    w = w.clone()
    alive = torch.ones(n_units, dtype=torch.bool, device=gram.device)
    offsets = torch.arange(width, device=gram.device)
    per_step = -(-n_remove // max(1, steps))
    removed: list[int] = []
    while len(removed) < n_remove:
        units = alive.nonzero().squeeze(1)
        cols = units[:, None] * width + offsets[None, :]  # [u, width]
        if width == 1:  # MLP channels: the 1 x 1 blocks' inverses are reciprocals (no batched LAPACK calls)
            blocks = (1.0 / hinv.diagonal()[units])[:, None, None]
        else:
            blocks = torch.linalg.inv(hinv[cols[:, :, None], cols[:, None, :]])  # [u, width, width]
        wb = w[:, cols]  # [out, u, width]
        err = torch.einsum("oui,uij,ouj->u", wb, blocks, wb)
        want = min(per_step, n_remove - len(removed))
        if families is None:
            take = units[err.argsort()[:want]]
        else:  # cheapest first, skipping units whose family has lost its quota
            lost = torch.bincount(families[~alive.cpu()], minlength=int(families.max()) + 1).tolist()
            picked = []
            for u in units[err.argsort()].tolist():
                if lost[int(families[u])] < quota:
                    picked.append(u)
                    lost[int(families[u])] += 1
                    if len(picked) == want:
                        break
            take = torch.tensor(picked, dtype=torch.long, device=gram.device)
        b = (take[:, None] * width + offsets[None, :]).reshape(-1)
        m = torch.linalg.inv(hinv[b][:, b])
        w -= w[:, b] @ m @ hinv[b, :]
        hinv -= hinv[:, b] @ m @ hinv[b, :]
        alive[take] = False
        removed += take.tolist()
    return sorted(removed)


# --------------------------------------------------------------------------------------------
# The sequential stage.

@dataclass
class ReconstructResult:
    model: nn.Module
    plan: PrunePlan
    info: dict = field(default_factory=dict)


class _Moments:
    """Second moments of one projection's inputs, accumulated in float64 on the device."""

    def __init__(self, n_in: int, device: torch.device, with_target: bool):
        zeros = lambda: torch.zeros(n_in, n_in, dtype=torch.float64, device=device)  # noqa: E731
        self.gram = zeros()
        self.cross = zeros() if with_target else None  # sum z_dense x^T
        self.gram_target = zeros() if with_target else None  # sum z_dense z_dense^T

    def add(self, x: torch.Tensor, z_target: torch.Tensor | None = None) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.gram += (x.T @ x).double()
        if z_target is not None:
            z = z_target.reshape(-1, z_target.shape[-1]).float()
            self.cross += (z.T @ x).double()
            self.gram_target += (z.T @ z).double()

    def targets(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(cross, gram_target): for the "prefix" target both are the gram itself."""
        return (self.gram, self.gram) if self.cross is None else (self.cross, self.gram_target)


@contextmanager
def _input_of(module: nn.Module):
    """Capture the input of `module` during the block: box["x"]."""
    box: dict = {}
    handle = module.register_forward_pre_hook(lambda m, args: box.__setitem__("x", args[0]))
    try:
        yield box
    finally:
        handle.remove()


@contextmanager
def on_device(module: nn.Module, device: torch.device):
    """`module` on `device` during the block, back where it was afterwards."""
    home = next(itertools.chain(module.parameters(), module.buffers())).device
    module.to(device)
    try:
        yield module
    finally:
        module.to(home)


def _attention_mask(config, seq_len: int, dtype, device) -> torch.Tensor | None:
    """None (the attention kernels' own causal masking) except for eager attention."""
    if getattr(config, "_attn_implementation", "sdpa") != "eager":
        return None
    mask = torch.full((seq_len, seq_len), torch.finfo(dtype).min, dtype=dtype, device=device).triu(1)
    return mask[None, None]


def layer_context(model: nn.Module, seq_len: int, dtype, device) -> tuple:
    """(position embeddings, attention mask) for running one decoder layer of `model` alone on
    windows of `seq_len` tokens (positions 0 .. seq_len - 1) on `device`."""
    rotary = getattr(model, "model", model).rotary_emb
    with on_device(rotary, device):
        probe = torch.zeros(1, seq_len, 1, dtype=dtype, device=device)
        pos = rotary(probe, torch.arange(seq_len, device=device)[None])
    return pos, _attention_mask(model.config, seq_len, dtype, device)


class _Stage:
    """State of one reconstruction pass: streams, settings, device, per-layer log."""

    def __init__(self, dense, slim, plan, samples, r: ReconstructSettings, device, solve_dtype: str = "auto"):
        self.plan, self.r, self.device = plan, r, device
        self.work = work_dtype(torch.device(device), solve_dtype)
        self.shapes = discover(dense)
        self.dtype = next(slim.parameters()).dtype
        n, t = samples.shape
        self.batches = [slice(s, min(s + r.batch_size, n)) for s in range(0, n, r.batch_size)]
        embed = slim.get_input_embeddings()
        with torch.no_grad():
            self.stream = torch.cat([embed(samples[b].to(embed.weight.device)).to("cpu", self.dtype) for b in self.batches])
        self.dense_stream = self.stream.clone() if r.target == "dense" else None
        self.pos, self.mask = layer_context(slim, t, self.dtype, device)
        self.drifted = False  # has any earlier layer changed the stream?
        self.log: list[dict] = []

    def _dense_pass(self, dl, kind: str, inputs: torch.Tensor, moments: _Moments | None, dense_inputs=None):
        """Run the dense layer's block of `kind` over the stream `inputs`, storing the output
        projection's full inputs (CPU) and accumulating their moments; on the dense stream
        too when the target is "dense". Returns (stored inputs, dense-stream block outputs)."""
        block, norm = (dl.self_attn, dl.input_layernorm) if kind == ATTN else (dl.mlp, dl.post_attention_layernorm)
        stored, dense_out = [], []
        with onednn_linears(block):
            proj = submodule(dl, OUTPUT_PROJ[kind])
            for b in self.batches:
                stored.append(self._dense_batch(block, kind, norm, proj, inputs[b], moments,
                                                None if dense_inputs is None else dense_inputs[b], dense_out))
        return torch.cat(stored), (torch.cat(dense_out) if dense_inputs is not None else None)

    def _dense_batch(self, block, kind, norm, proj, x, moments, x_dense, dense_out) -> torch.Tensor:
        """One batch of `_dense_pass`: the stored full input of the output projection."""
        with _input_of(proj) as box:
            self._block(block, kind, norm(x.to(self.device)))
            z = box["x"]
        z_target = None
        if x_dense is not None:
            with _input_of(proj) as dbox:
                dense_out.append(self._block(block, kind, norm(x_dense.to(self.device))).to("cpu"))
                z_target = dbox["x"]
        if moments is not None:
            moments.add(z, z_target)
        return z.to("cpu")

    def _block(self, block, kind: str, x: torch.Tensor) -> torch.Tensor:
        if kind == ATTN:
            return block(hidden_states=x, position_embeddings=self.pos, attention_mask=self.mask)[0]
        return block(x)

    def _advance(self, inputs: torch.Tensor, z: torch.Tensor, keep: torch.Tensor, proj: nn.Linear) -> torch.Tensor:
        """The pruned stream after the block: inputs + (slim projection of the kept z)."""
        out = []
        for b in self.batches:
            x = z[b].to(self.device).index_select(-1, keep.to(self.device))
            y = nn.functional.linear(x, proj.weight.to(self.device), None if proj.bias is None else proj.bias.to(self.device))
            out.append((inputs[b].to(self.device) + y).to("cpu"))
        return torch.cat(out)

    def layer(self, i: int, dl: nn.Module, sl: nn.Module) -> None:
        """Attention, then MLP, of decoder layer i: refit, and move both streams past it."""
        entry = {"layer": i}
        mid, dense_mid = self._kind(i, ATTN, dl, sl, self.stream, self.dense_stream, entry)
        self.stream, self.dense_stream = self._kind(i, MLP, dl, sl, mid, dense_mid, entry)
        self.log.append(entry)

    def _kind(self, i, kind, dl, sl, inputs, dense_inputs, entry):
        """Refit one block kind of layer i; returns the (pruned, dense) streams after it."""
        shape, lp = self.shapes[i], self.plan.layers[i]
        part = "q" if kind == ATTN else "ch"
        if kind == ATTN and lp.attention_free:  # the whole module left (or never was): nothing to refit
            if not shape.n_kv:
                return inputs, dense_inputs
            # the block's whole output is gone: relative error 1 before and after (no refit)
            entry[kind] = {"removed_units": shape.n_kv, "module": True, "rel_err_sliced": 1.0, "rel_err_refit": 1.0}
            dense_next = None
            if dense_inputs is not None:
                _, dense_out = self._dense_pass(dl, kind, inputs, None, dense_inputs)
                dense_next = dense_inputs + dense_out
            self.drifted = True
            return inputs, dense_next
        n_remove = _removed(lp, shape, kind)
        refits = n_remove > 0 or (self.r.target == "dense" and self.drifted)
        moments = _Moments(shape.n_units(kind) * shape.unit_width(part), self.device, self.r.target == "dense") if refits else None
        z, dense_out = self._dense_pass(dl, kind, inputs, moments, dense_inputs)
        if refits:
            self._refit(i, kind, dl, sl, moments, entry)
            self.drifted = self.drifted or n_remove > 0 or self.r.target == "dense"
        keep = kept_index(lp, shape, part)
        dense_next = None if dense_inputs is None else dense_inputs + dense_out
        return self._advance(inputs, z, keep, submodule(sl, OUTPUT_PROJ[kind])), dense_next

    def _refit(self, i: int, kind: str, dl, sl, moments: _Moments, entry: dict) -> None:
        """Choose the kept units (local selection), refit the slim output projection in place,
        log the errors."""
        shape, lp, path = self.shapes[i], self.plan.layers[i], OUTPUT_PROJ[kind]
        part = "q" if kind == ATTN else "ch"
        # several processes: each streamed its own samples; the moments of all of them are the sum
        processes().sum_(*(m for m in (moments.gram, moments.cross, moments.gram_target) if m is not None))
        cross, gram_t = moments.targets()
        if not all(torch.isfinite(m).all() for m in (moments.gram, cross, gram_t)):
            raise UserError(f"layer {i} {path}: NaN or inf in the calibration activations the refit reads; "
                            "check the model's weights, or use --reconstruct none")
        gram = moments.gram.to(self.work)
        cross, gram_t = (gram, gram) if cross is moments.gram else (cross.to(self.work), gram_t.to(self.work))
        del moments
        w = submodule(dl, path).weight.detach().to(self.device, self.work)
        n_remove = _removed(lp, shape, kind)
        if self.r.select == "local" and n_remove > 0:
            _select_local(lp, shape, kind, w, gram, self.r.damp)
            _reslice(dl, sl, shape, kind, lp)
        keep = kept_index(lp, shape, part).to(self.device)
        w_new = refit(w, cross, gram, keep, self.r.damp)
        yy = target_energy(w, gram_t)  # shared by both errors below
        if not torch.isfinite(w_new).all():
            raise UserError(f"layer {i} {path}: the refit is not finite; raise --recon-damp or use --reconstruct none")
        entry[kind] = {"removed_units": shape.n_units(kind) - len(lp.kv_groups if kind == ATTN else lp.channels),
                       "rel_err_sliced": output_error(w[:, keep], w, cross, gram, gram_t, keep, yy),
                       "rel_err_refit": output_error(w_new, w, cross, gram, gram_t, keep, yy)}
        if kind == ATTN and lp.kept_heads < len(lp.kv_groups) * shape.n_rep:
            entry[kind]["removed_heads"] = shape.n_heads - lp.kept_heads
        proj = submodule(sl, path)
        proj.weight.copy_(w_new.to(proj.weight.dtype))


def work_dtype(device: torch.device, choice: str = "auto") -> torch.dtype:
    """The refit's solves and OBS selection (--solve-dtype): auto is float32 on a GPU (consumer
    cards run float64 at 1/64 of float32; benchmarks/results/reconstruct_precision.md measured
    float32 changing SmolLM2's refit errors by <= 2.4e-7 relative and OBS picking the same
    units), float64 on the CPU (only half the speed there, and the CPU results stay what they
    were). Gram matrices are always summed in float64 from float32 products."""
    if choice == "auto":
        return torch.float32 if device.type == "cuda" else torch.float64
    table = {"float32": torch.float32, "float64": torch.float64}
    if choice not in table:
        raise UserError(f"--solve-dtype {choice!r} is not one of auto, float32, float64")
    return table[choice]


def _removed(lp: LayerPlan, shape: LayerShape, kind: str) -> int:
    """Units of `kind` the plan removes from this layer (query heads for attention: a KV
    group counts as its heads)."""
    return shape.n_heads - lp.kept_heads if kind == ATTN else shape.ffn - len(lp.channels)


def _select_local(lp: LayerPlan, shape: LayerShape, kind: str, w: torch.Tensor, gram: torch.Tensor, damp: float) -> None:
    """Re-choose, in place, which units `lp` keeps, as many as it keeps now, by structured OBS
    on the o_proj / down_proj inputs: first whole KV groups (blocks of their query heads), then
    within the kept groups the same number of query heads in each."""
    if kind == MLP:
        gone = set(obs_select(w, gram, 1, shape.ffn - len(lp.channels), damp))
        lp.channels = [u for u in range(shape.ffn) if u not in gone]
        return
    n_groups = len(lp.kv_groups)
    per_group = lp.kept_heads // n_groups
    gone = set(obs_select(w, gram, shape.unit_width("q"), shape.n_kv - n_groups, damp)) if n_groups < shape.n_kv else set()
    lp.kv_groups = [g for g in range(shape.n_kv) if g not in gone]
    lp.heads = None
    if per_group < shape.n_rep:
        heads = torch.tensor(lp.group_heads(lp.kv_groups), dtype=torch.long)
        cols = member_index(heads, shape, "qh").to(gram.device)
        families = heads // shape.n_rep
        dropped = set(obs_select(w[:, cols], gram[cols][:, cols], shape.head_dim, (shape.n_rep - per_group) * n_groups, damp,
                                 families=families, quota=shape.n_rep - per_group))
        lp.heads = [int(h) for j, h in enumerate(heads) if j not in dropped]


def _reslice(dl: nn.Module, sl: nn.Module, shape: LayerShape, kind: str, lp: LayerPlan) -> None:
    """Load the slim layer's `kind` weights from the dense layer for the units `lp` now keeps."""
    with torch.no_grad():
        for path, axis, part in MEMBERS[kind]:
            src, dst = submodule(dl, path), submodule(sl, path)
            index = kept_index(lp, shape, part)
            dst.weight.copy_(take_lines(src.weight, axis, index))
            if axis == "out" and src.bias is not None:
                dst.bias.copy_(take_lines(src.bias, axis, index))


@torch.no_grad()
def reconstruct(
    dense: nn.Module,
    slim: nn.Module,
    plan: PrunePlan,
    samples: torch.Tensor,
    r: ReconstructSettings,
    device: torch.device | str | None = None,
    progress: bool = True,
    streamed: bool = False,
    solve_dtype: str = "auto",
) -> ReconstructResult:
    """Refit `slim` (sliced from `dense` by `plan`) layer by layer on the calibration windows
    `samples` [N, T]; `slim` is changed in place and `plan` too under local selection.
    `streamed`: `slim` comes from `slicing.empty_slim` + `fill_outer` and each of its layers is
    sliced here just before its refit, after which the dense layer is freed (`dense` is used up:
    the two models together never hold much more than the dense one).
    Returns the model, the plan and what the stage did (per-layer errors, time, peak memory)."""
    if not r.active:
        return ReconstructResult(slim, plan, {"method": "none"})
    device = torch.device(device) if device is not None else next(slim.parameters()).device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    with PeakRSS() as rss:
        procs = processes()
        if samples.shape[0] < procs.world:
            raise UserError(f"{samples.shape[0]} reconstruction samples for {procs.world} processes: each process needs "
                            "at least one; raise --recon-samples or launch fewer processes")
        # several processes: each streams its share of the windows through the layers
        stage = _Stage(dense, slim, plan, samples[procs.share(samples.shape[0])], r, device, solve_dtype)
        pairs = list(zip(decoder_layers(dense), decoder_layers(slim)))
        for i, (dl, sl) in enumerate(tqdm(pairs, desc="reconstruct", disable=not progress or not procs.main)):
            if streamed:
                fill_layer(dense, slim, plan, i)
            with on_device(dl, device), on_device(sl, device):
                stage.layer(i, dl, sl)
            if streamed:
                release_layer(dense, i)
    info = {
        **r.to_dict(),
        "tokens": int(samples.numel()),
        "time_s": time.perf_counter() - t0,
        "processes": procs.world,
        "solve_dtype": str(stage.work).replace("torch.", ""),
        "peak_rss_mib": rss.peak_mib,
        "device": str(device),
        "layers": stage.log,
    }
    if device.type == "cuda":
        info["peak_device_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return ReconstructResult(slim, plan, info)
