"""Rotary embedding frequency tables: inverse frequencies with optional scaling, then cos/sin per position."""

from __future__ import annotations

import math

import numpy as np

from engine.model.config import ModelConfig


def inv_freq(config: ModelConfig, freq_factors: np.ndarray | None = None, local: bool = False) -> np.ndarray:
    """(head_dim/2,) float64 inverse frequencies theta^(-2i/d), after Llama-3 scaling if configured.

    freq_factors: GGUF's `rope_freqs.weight`, llama.cpp's precomputed Llama-3 divisors; it replaces
    the rope_scaling computation for GGUF files. local: the sliding layers' RoPE (Gemma 3), with its own
    base and no scaling.
    """
    d = config.head_dim
    theta = config.rope_local_base_freq if local else config.rope_theta
    base = 1.0 / (theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    if local:
        return base
    if freq_factors is not None:
        return base / freq_factors.astype(np.float64)
    rs = config.rope_scaling
    if not rs or rs.get("rope_type", rs.get("type")) in (None, "default", "linear"):
        return base
    # Llama 3.1 "llama3" scaling (Meta's reference apply_scaling): long wavelengths are divided by
    # `factor`, short ones kept, and the band between interpolated smoothly.
    factor = float(rs["factor"])
    low, high = float(rs.get("low_freq_factor", 1.0)), float(rs.get("high_freq_factor", 4.0))
    old_ctx = float(rs.get("original_max_position_embeddings", 8192))
    wavelen = 2 * math.pi / base
    smooth = (old_ctx / wavelen - low) / (high - low)
    scaled = np.where(wavelen > old_ctx / low, base / factor, base)
    mid = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
    return np.where(mid, (1 - smooth) * base / factor + smooth * base, scaled)


def position_scale(config: ModelConfig, local: bool = False) -> float:
    """Linear rope scaling divides positions by `factor` (never in the local RoPE)."""
    rs = None if local else config.rope_scaling
    if rs and rs.get("rope_type", rs.get("type")) == "linear":
        return 1.0 / float(rs["factor"])
    return 1.0


def cos_sin(positions: np.ndarray, freqs: np.ndarray, pos_scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """positions (n,) int -> cos, sin (n, head_dim/2) float32 (computed in float64, then rounded)."""
    angles = np.outer(positions.astype(np.float64) * pos_scale, freqs)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


class RopeTable:
    """cos, sin of every position used so far, grown by doubling and reused, for each RoPE the layers use:
    kind 0 the global one, kind 1 the local one of sliding layers when it differs (config.layer_rope)."""

    def __init__(self, config: ModelConfig, freq_factors: np.ndarray | None = None):
        kinds = (False, True) if any(config.layer_rope) else (False,)
        self.kinds = [(inv_freq(config, freq_factors, local), position_scale(config, local)) for local in kinds]
        self.cos = self.sin = np.zeros((len(kinds), 0, config.head_dim // 2), dtype=np.float32)  # (kinds, positions, hd/2)

    def table(self, start: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """cos, sin (kinds, n, head_dim/2) f32 for positions start..start+n-1."""
        if self.cos.shape[1] < start + n:
            positions = np.arange(max(start + n, 2 * self.cos.shape[1]))
            tables = [cos_sin(positions, freqs, scale) for freqs, scale in self.kinds]
            self.cos = np.stack([c for c, _ in tables])
            self.sin = np.stack([s for _, s in tables])
        return self.cos[:, start:start + n], self.sin[:, start:start + n]
