"""Model configuration: a frozen dataclass with Hugging Face config.json field names.

`from_hf_dict` reads an HF config (unknown keys ignored, required ones checked); the GGUF loader builds
the same dict from GGUF metadata. Derived fields are computed once, in __post_init__.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from engine.errors import ConfigError
from kernels.activation import DRELU, GELU, GELU_TANH, RELU, SILU

# architecture name -> model_type; Bamboo is TurboSparse-Mistral / Bamboo-7B: Mistral with dReLU.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "BambooForCausalLM": "bamboo",
    "Qwen3ForCausalLM": "qwen3",
    "Phi3ForCausalLM": "phi3",
    "Gemma3ForCausalLM": "gemma3_text",
}
# What the layers of each model type add to the Llama layer (engine/executors/stack.py runs them):
QK_NORM_TYPES = {"qwen3", "gemma3_text"}        # RMSNorm of each q and k head before RoPE
SANDWICH_NORM_TYPES = {"gemma3_text"}           # RMSNorm of the attention and FFN outputs too
SCALED_EMBEDDING_TYPES = {"gemma3_text"}        # embeddings times sqrt(hidden_size)
PLUS_ONE_NORM_TYPES = {"gemma3_text"}           # HF checkpoints store RMSNorm weights as w - 1


_ACTIVATIONS = {
    "silu": SILU, "swish": SILU,
    "gelu": GELU,
    "gelu_new": GELU_TANH, "gelu_pytorch_tanh": GELU_TANH, "gelu_fast": GELU_TANH,
    "relu": RELU,
}

_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    sliding_window: int | None = None
    use_sliding_window: bool = True
    layer_types: tuple | None = None            # per layer "sliding_attention" or "full_attention"
    rope_local_base_freq: float | None = None   # RoPE base of the sliding layers (Gemma 3)
    query_pre_attn_scalar: float | None = None  # attention scale 1/sqrt(this) instead of 1/sqrt(head_dim)
    hidden_activation: str | None = None        # Gemma's name for hidden_act; wins when set
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None
    partial_rotary_factor: float = 1.0
    model_type: str = "llama"
    architectures: tuple = ("LlamaForCausalLM",)
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    source: str = field(default="config.json", compare=False)

    # derived (set in __post_init__)
    act_kind: int = field(init=False)
    qkv_bias: bool = field(init=False)
    o_bias: bool = field(init=False)
    window: int = field(init=False)              # the sliding window of the windowed layers, 0 for none
    layer_window: tuple = field(init=False)      # per layer: its sliding window, 0 for full attention
    layer_rope: tuple = field(init=False)        # per layer: 0 the global RoPE base, 1 the local one
    qk_norm: bool = field(init=False)
    sandwich_norms: bool = field(init=False)
    embed_scale: float = field(init=False)
    attn_scale: float = field(init=False)

    @property
    def llama_layers(self) -> bool:
        """Whether every layer is a plain Llama layer (one window and one RoPE for all, no extra norms,
        the 1/sqrt(head_dim) attention scale, no scaled embeddings): what the ONNX prefill graph builds."""
        return (len(set(self.layer_window)) == 1 and not any(self.layer_rope) and not self.qk_norm
                and not self.sandwich_norms and self.embed_scale == 1.0
                and self.attn_scale == 1.0 / self.head_dim ** 0.5 and not self.final_logit_softcapping)

    def __post_init__(self):
        set_ = object.__setattr__
        if self.num_key_value_heads is None:
            set_(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            set_(self, "head_dim", self.hidden_size // self.num_attention_heads)
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"{self.source}: {name}={getattr(self, name)} must be a positive integer")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"{self.source}: num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"{self.source}: head_dim={self.head_dim} must be even for rotary embeddings")
        act_name = self.hidden_activation if self.hidden_activation is not None else self.hidden_act
        act = _ACTIVATIONS.get(str(act_name).lower())
        if act is None:
            raise ConfigError(
                f"{self.source}: hidden_act={act_name!r} is not supported "
                f"(supported: {', '.join(sorted(_ACTIVATIONS))})")
        if self.model_type == "bamboo":
            if act != RELU:
                raise ConfigError(f"{self.source}: a bamboo (dReLU) model needs hidden_act='relu', got {self.hidden_act!r}")
            act = DRELU
        set_(self, "act_kind", act)
        # Qwen2 always has q/k/v biases and no o bias; Llama's attention_bias puts a bias on all four.
        set_(self, "qkv_bias", self.model_type == "qwen2" or bool(self.attention_bias))
        set_(self, "o_bias", self.model_type != "qwen2" and bool(self.attention_bias))
        # Qwen configs carry a sliding_window they don't use unless use_sliding_window is set.
        use = self.sliding_window and (self.model_type not in ("qwen2", "qwen3") or self.use_sliding_window)
        set_(self, "window", int(self.sliding_window) if use else 0)
        self._layer_kinds()
        if self.attn_logit_softcapping:
            raise ConfigError(f"{self.source}: attn_logit_softcapping={self.attn_logit_softcapping} is not supported "
                              "(Gemma 2); use a model without attention soft-capping")
        if float(self.partial_rotary_factor) != 1.0:
            raise ConfigError(f"{self.source}: partial_rotary_factor={self.partial_rotary_factor} is not supported; "
                              "pocketinfer rotates whole heads")
        set_(self, "qk_norm", self.model_type in QK_NORM_TYPES)
        set_(self, "sandwich_norms", self.model_type in SANDWICH_NORM_TYPES)
        set_(self, "embed_scale", float(self.hidden_size) ** 0.5 if self.model_type in SCALED_EMBEDDING_TYPES else 1.0)
        scalar = self.query_pre_attn_scalar if self.query_pre_attn_scalar is not None else self.head_dim
        set_(self, "attn_scale", 1.0 / float(scalar) ** 0.5)
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ("default", "llama3", "linear"):
                raise ConfigError(
                    f"{self.source}: rope_scaling type {kind!r} is not supported (supported: llama3, linear)")

    def _layer_kinds(self) -> None:
        """layer_window and layer_rope from layer_types, or from Gemma 3's every-sixth-layer-global
        pattern when a config predates layer_types; else every layer has `window` and the global RoPE."""
        n, set_ = self.num_hidden_layers, object.__setattr__
        types = self.layer_types
        if self.model_type == "gemma3_text":
            if types is None:
                types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n)]
            if self.rope_local_base_freq is None:
                set_(self, "rope_local_base_freq", 10000.0)    # the Gemma 3 default (and llama.cpp's)
        if types is None:
            set_(self, "layer_window", (self.window,) * n)
            set_(self, "layer_rope", (0,) * n)
            return
        types = tuple(types)
        if len(types) != n or not set(types) <= {"sliding_attention", "full_attention"}:
            raise ConfigError(f"{self.source}: layer_types must list 'sliding_attention' or 'full_attention' for "
                              f"each of the {n} layers")
        set_(self, "layer_types", types)
        sliding = [t == "sliding_attention" for t in types]
        set_(self, "layer_window", tuple(int(self.sliding_window or 0) if s else 0 for s in sliding))
        local = self.rope_local_base_freq is not None
        set_(self, "layer_rope", tuple(int(s and local) for s in sliding))
        uniform = len(set(self.layer_window)) == 1
        set_(self, "window", self.layer_window[0] if uniform else int(self.sliding_window))

    @property
    def eos_ids(self) -> tuple[int, ...]:
        e = self.eos_token_id
        if e is None:
            return ()
        return tuple(int(i) for i in e) if isinstance(e, (list, tuple)) else (int(e),)

    @classmethod
    def from_hf_dict(cls, d: dict, source: str = "config.json") -> "ModelConfig":
        archs = d.get("architectures") or []
        model_type = d.get("model_type")
        if model_type is None and archs:
            model_type = SUPPORTED_ARCHITECTURES.get(archs[0])
        known_types = set(SUPPORTED_ARCHITECTURES.values())
        if model_type not in known_types or (archs and archs[0] not in SUPPORTED_ARCHITECTURES):
            shown = f"architectures={archs}" if archs else f"model_type={model_type!r}"
            raise ConfigError(
                f"{source}: {shown} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
        for name in _REQUIRED:
            if d.get(name) is None:
                raise ConfigError(f"{source}: required field {name!r} is missing; add it or re-export the model")
        known = {f.name for f in fields(cls) if f.init}
        kwargs = {k: v for k, v in d.items() if k in known}
        # transformers >= 5 writes rope settings as rope_parameters = {rope_type, rope_theta, ...}.
        params = d.get("rope_parameters")
        if isinstance(params, dict) and "full_attention" in params:
            # Gemma 3: one RoPE per attention kind, the sliding layers' without scaling
            local = params.get("sliding_attention") or {}
            if local.get("rope_type", "default") != "default":
                raise ConfigError(f"{source}: rope_parameters.sliding_attention type {local['rope_type']!r} is not "
                                  "supported (supported: default)")
            if "rope_theta" in local:
                kwargs["rope_local_base_freq"] = local["rope_theta"]
            params = params["full_attention"]
        if isinstance(params, dict):
            if "partial_rotary_factor" in params:
                kwargs["partial_rotary_factor"] = params["partial_rotary_factor"]
            if "rope_theta" in params:
                kwargs["rope_theta"] = params["rope_theta"]
            if params.get("rope_type", "default") != "default":
                kwargs["rope_scaling"] = params
        kwargs["architectures"] = tuple(archs) or (next(a for a, t in SUPPORTED_ARCHITECTURES.items() if t == model_type),)
        kwargs["model_type"] = model_type
        kwargs["source"] = source
        try:
            return cls(**kwargs)
        except TypeError as e:  # a value of the wrong JSON type, e.g. a string where a number goes
            raise ConfigError(f"{source}: {e}") from None
