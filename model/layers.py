"""The stateless-weight parts of a layer: recurrence mixer, feed-forward, working memory."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig
from model.scan import affine_scan, fused_scan_available, opaque_gated_scan


def float32_or_wider(x: torch.Tensor) -> torch.dtype:
    """The dtype for recurrence and memory math: float32 under AMP, float64 when the model is float64."""
    return torch.promote_types(x.dtype, torch.float32)


def inverse_sigmoid(p: torch.Tensor) -> torch.Tensor:
    return torch.log(p) - torch.log1p(-p)


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm in its weight's dtype (float32 in a float32 model) whatever its input's: under
    autocast the residual stream is bf16 (`model.lm.residual_stream`), and torch's fused kernel
    takes an input and a weight of one dtype. Given a bf16 input and a float32 weight, torch 2.11
    on CUDA ran a composite of ~8 kernels a norm: on the H200 (session 17) the eager sleep step
    went from ~90 to 150 ms. The output stays float32, as autocast's norms gave before, so the
    memories' queries keep their precision; compiled, the cast fuses into the norm's kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.to(self.weight.dtype))


class AffineScan(nn.Module):
    """Gated diagonal recurrence h_t = a_t * h_{t-1} + (1 - a_t) * x_t, with a_t, x_t from the input only."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d = config.d_model
        self.gate_form = config.gate
        self.in_proj = nn.Linear(d, 3 * d, bias=False)  # -> gate pre-activation, input, output gate
        self.out_proj = nn.Linear(d, d, bias=False)
        # Per-channel retention between 0.9 and 0.999: a spread of time scales from ~10 to ~1000 bytes.
        retention = 1.0 - torch.logspace(-1, -3, d)
        bias = inverse_sigmoid(retention) if self.gate_form == "sigmoid" else -inverse_sigmoid(retention)
        self.gate_bias = nn.Parameter(bias)

    def retention(self, gate_pre: torch.Tensor) -> torch.Tensor:
        z = gate_pre + self.gate_bias
        return torch.sigmoid(z) if self.gate_form == "sigmoid" else torch.exp(-F.softplus(z))

    def forward(self, u: torch.Tensor, carry: torch.Tensor, last: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """u: (b, T, d), carry: (b, d) -> y: (b, T, d) in the projections' dtype, new carry (b, d) in
        float32 or wider. last: (b,) each user's last position when right-padded (None: T - 1 for
        all). On CUDA, in float32 or lower, one Triton pass does the gates, scan and output gate
        (`model.scan.gated_scan`); the torch path below is what it computes."""
        proj = self.in_proj(u)
        if (last is None and proj.shape[1] > 1 and proj.is_cuda and float32_or_wider(u) == torch.float32
                and fused_scan_available()):
            out, h_last = opaque_gated_scan(proj, self.gate_bias, carry, 1 if self.gate_form == "sigmoid" else -1)
            return self.out_proj(out), h_last
        gate_pre, x, out_gate = proj.chunk(3, dim=-1)
        wide = float32_or_wider(u)
        a = self.retention(gate_pre.to(wide))
        h = affine_scan(a, (1.0 - a) * x.to(wide), carry.to(wide))
        y = self.out_proj((h.to(u.dtype)) * F.silu(out_gate))
        return y, h[:, -1] if last is None else h[torch.arange(h.shape[0], device=h.device), last]


class DenseFeedForward(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        hidden = config.ff_mult * config.d_model
        self.up = nn.Linear(config.d_model, hidden, bias=False)
        self.down = nn.Linear(hidden, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class MixtureFeedForward(nn.Module):
    """Two half-width experts mixed by a soft router: same parameters as dense, input-dependent."""

    def __init__(self, config: ModelConfig, n_experts: int = 2) -> None:
        super().__init__()
        hidden = config.ff_mult * config.d_model // n_experts
        self.router = nn.Linear(config.d_model, n_experts, bias=False)
        self.up = nn.Linear(config.d_model, n_experts * hidden, bias=False)
        self.down = nn.Linear(n_experts * hidden, config.d_model, bias=False)
        self.n_experts, self.hidden = n_experts, hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(self.router(x), dim=-1)  # (b, T, e)
        h = F.gelu(self.up(x)).unflatten(-1, (self.n_experts, self.hidden)) * weights[..., None]
        return self.down(h.flatten(-2))


def feed_forward(config: ModelConfig) -> nn.Module:
    return MixtureFeedForward(config) if config.ff_type == "mixture" else DenseFeedForward(config)


class WorkingMemory(nn.Module):
    """One shared causal sliding-window attention (window W) with a ring-buffer cache in the FastState.

    No positional encoding: the recurrence below it already encodes order. Attention itself runs
    through torch's scaled_dot_product_attention.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.window = config.n_heads, config.window
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.out = nn.Linear(config.d_model, config.d_model, bias=False)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.n_heads, -1)).transpose(1, 2)  # (b, T, d) -> (b, h, T, d/h)

    def forward(self, u: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor,
                cache_pos: torch.Tensor, pos: torch.Tensor, fresh: bool, lengths: torch.Tensor | None = None,
                in_place: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """u: (b, T, d); cache_k/v: (b, W, d); cache_pos: (b, W) absolute positions (-1 empty);
        pos: (b,) position of u[:, 0]; fresh: every row starts at position 0 with an empty cache;
        lengths: (b,) each user's bytes when right-padded (None: T each). Padding comes after a
        user's bytes, so causal attention never lets them see it; only the cache must skip it.
        in_place: the caller gives up the cache, so one byte's step writes it in place.
        Returns the output (b, T, d) and the updated cache."""
        length = u.shape[1]
        q, k, v = self.qkv(u).chunk(3, dim=-1)
        if length == 1 and not fresh:
            return self._step(q, k, v, cache_k, cache_v, cache_pos, pos, in_place)
        query_pos = pos[:, None] + torch.arange(length, device=u.device)  # (b, T)
        if fresh and length <= self.window:  # the window's mask would be causal's: attention's causal kernels
            attended = F.scaled_dot_product_attention(self._heads(q), self._heads(k), self._heads(v), is_causal=True)
        elif fresh:
            attended = sliding_window_attention(self._heads(q), self._heads(k), self._heads(v), self.window)
        else:
            keys = torch.cat([cache_k.to(k.dtype), k], dim=1)
            vals = torch.cat([cache_v.to(v.dtype), v], dim=1)
            key_pos = torch.cat([cache_pos, query_pos], dim=1)[:, None, :]  # (b, 1, W+T)
            qp = query_pos[:, :, None]
            mask = ((key_pos >= 0) & (key_pos <= qp) & (key_pos > qp - self.window))[:, None]
            attended = F.scaled_dot_product_attention(self._heads(q), self._heads(keys), self._heads(vals),
                                                      attn_mask=mask)
        out = self.out(attended.transpose(1, 2).flatten(-2))

        if lengths is not None:
            return (out, *self._cache_last_window(k, v, cache_k, cache_v, cache_pos, pos, lengths))
        keep = min(length, self.window)
        slot = (query_pos[:, -keep:] % self.window)
        index = slot[..., None].expand(-1, -1, k.shape[-1])
        cache_k = cache_k.scatter(1, index, k[:, -keep:].to(cache_k.dtype))
        cache_v = cache_v.scatter(1, index, v[:, -keep:].to(cache_v.dtype))
        cache_pos = cache_pos.scatter(1, slot, query_pos[:, -keep:])
        return out, cache_k, cache_v, cache_pos

    def _step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor,
              cache_pos: torch.Tensor, pos: torch.Tensor, in_place: bool
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One byte per user (decoding): its key and value go into the ring first, then the query
        attends to the ring alone, which now holds exactly the window. Joining cache and key would
        copy the whole cache every step (and cast it, under autocast): on the H200, at 256 users of
        `base`, that copy and the ring's out-of-place update took 0.33 ms of a 2.1 ms step. The
        ring is written by indexed assignment, which a compiled step keeps in place (a `scatter_`
        it copied whole, twice). The attention runs in the cache's precision, float32 like the
        other memory math."""
        rows, slot = torch.arange(pos.shape[0], device=pos.device), pos % self.window
        entries = (k[:, 0].to(cache_k.dtype), v[:, 0].to(cache_v.dtype), pos)
        if in_place:
            for cache, entry in zip((cache_k, cache_v, cache_pos), entries):
                cache[rows, slot] = entry
        else:
            cache_k, cache_v, cache_pos = (cache.index_put((rows, slot), entry)
                                           for cache, entry in zip((cache_k, cache_v, cache_pos), entries))
        within = (cache_pos >= 0) & (cache_pos > pos[:, None] - self.window)  # (b, W)
        with torch.autocast(device_type=q.device.type, enabled=False):
            attended = attend_one(self._heads(q.to(cache_k.dtype)), self._heads(cache_k), self._heads(cache_v),
                                  within, spelled_out=torch.compiler.is_compiling())
        out = self.out(attended.transpose(1, 2).flatten(-2))
        return out, cache_k, cache_v, cache_pos

    def _cache_last_window(self, k: torch.Tensor, v: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor,
                           cache_pos: torch.Tensor, pos: torch.Tensor, lengths: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The ring buffer after each user's own last W positions: every slot is rewritten once,
        from this call's keys where the position is the user's, else from the slot's old entry."""
        offset = lengths[:, None] - self.window + torch.arange(self.window, device=k.device)  # (b, W) in this call
        ours = offset >= 0
        slot = (pos[:, None] + offset) % self.window  # W consecutive positions: each slot once
        source = offset.clamp(min=0)[..., None].expand(-1, -1, k.shape[-1])
        index = slot[..., None].expand(-1, -1, k.shape[-1])

        def refill(cache: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
            entries = torch.where(ours[..., None], new.gather(1, source).to(cache.dtype), cache.gather(1, index))
            return cache.scatter(1, index, entries)

        positions = torch.where(ours, pos[:, None] + offset, cache_pos.gather(1, slot))
        return refill(cache_k, k), refill(cache_v, v), cache_pos.scatter(1, slot, positions)


def sliding_window_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, window: int
                             ) -> torch.Tensor:
    """Causal attention of each position over the last `window` positions (itself included), for
    query, keys and values (b, h, T, e) from position 0 with T > window. With a (T, T) mask the
    kernels score every pair (H200, `base` training at T=2048: 2.7 ms forward and backward, cuDNN's
    masked kernels); here the first window runs causal, and every later chunk of `window` queries
    attends to its own chunk and the one before, under one (W, 2W) band mask that all chunks share:
    a quarter of the pairs at T=2048, W=256 (0.8 ms). The same sums as the full mask's, up to
    rounding."""
    length = query.shape[2]
    first = F.scaled_dot_product_attention(*(t[:, :, :window] for t in (query, keys, values)), is_causal=True)
    pad = -length % window
    rest = F.pad(query[:, :, window:], (0, 0, 0, pad))  # (b, h, C * W, e)
    chunks = rest.shape[2] // window
    # Chunk c's queries are at (c + 1) W + i, its keys at c W + j (j < 2 W): visible where i < j <= i + W.
    before, mine = (torch.arange(n, device=query.device) for n in (2 * window, window))
    band = (before[None, :] > mine[:, None]) & (before[None, :] <= mine[:, None] + window)  # (W, 2W)

    def key_chunks(t: torch.Tensor) -> torch.Tensor:  # (b, h, T, e) -> (b, h * C, 2W, e), overlapping windows
        return F.pad(t, (0, 0, 0, pad)).unfold(2, 2 * window, window).transpose(-1, -2).flatten(1, 2)
    attended = F.scaled_dot_product_attention(rest.unflatten(2, (chunks, window)).flatten(1, 2), key_chunks(keys),
                                              key_chunks(values), attn_mask=band)
    later = attended.unflatten(1, (query.shape[1], chunks)).flatten(2, 3)[:, :, :length - window]
    return torch.cat([first, later], dim=2)


def attend_one(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, within: torch.Tensor,
               spelled_out: bool) -> torch.Tensor:
    """One query per (user, head) over its keys: query (b, h, 1, e), keys and values (b, h, W, e),
    within (b, W) the keys it may see. spelled_out: as products, a masked softmax and sums, which
    torch.compile fuses into two passes over the keys and values (H200, `base`, 256 users: ~0.1 ms,
    where torch's float32 attention kernel took 0.45 ms). Eagerly that kernel is the faster one
    (2 CPU cores, tiny, 16 users: 223 us against 261 us a step, the attention with the ring's
    update), so it is used unless compiling."""
    if not spelled_out:
        return F.scaled_dot_product_attention(query, keys, values, attn_mask=within[:, None, None])
    scores = (query * keys).sum(-1) / math.sqrt(query.shape[-1])  # (b, h, W)
    weights = torch.softmax(scores.masked_fill(~within[:, None], float("-inf")), dim=-1)
    return (weights[..., None] * values).sum(-2, keepdim=True)


def init_weights(module: nn.Module, n_layers: int) -> None:
    """GPT-2 style: N(0, 0.02), residual output projections scaled down by depth."""
    for name, parameter in module.named_parameters():
        if parameter.dim() == 2 and "neuromodulator" not in name:
            std = 0.02 / math.sqrt(2 * n_layers) if name.endswith(("out_proj.weight", "down.weight", "out.weight")) else 0.02
            nn.init.normal_(parameter, mean=0.0, std=std)
