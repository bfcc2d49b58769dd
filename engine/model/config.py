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
}

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
    model_type: str = "llama"
    architectures: tuple = ("LlamaForCausalLM",)
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    source: str = field(default="config.json", compare=False)

    # derived (set in __post_init__)
    act_kind: int = field(init=False)
    qkv_bias: bool = field(init=False)
    o_bias: bool = field(init=False)
    window: int = field(init=False)

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
        act = _ACTIVATIONS.get(str(self.hidden_act).lower())
        if act is None:
            raise ConfigError(
                f"{self.source}: hidden_act={self.hidden_act!r} is not supported "
                f"(supported: {', '.join(sorted(_ACTIVATIONS))})")
        if self.model_type == "bamboo":
            if act != RELU:
                raise ConfigError(f"{self.source}: a bamboo (dReLU) model needs hidden_act='relu', got {self.hidden_act!r}")
            act = DRELU
        set_(self, "act_kind", act)
        # Qwen2 always has q/k/v biases and no o bias; Llama's attention_bias puts a bias on all four.
        set_(self, "qkv_bias", self.model_type == "qwen2" or bool(self.attention_bias))
        set_(self, "o_bias", self.model_type != "qwen2" and bool(self.attention_bias))
        # Qwen2 configs carry a sliding_window they don't use unless use_sliding_window is set.
        use = self.sliding_window and (self.model_type != "qwen2" or self.use_sliding_window)
        set_(self, "window", int(self.sliding_window) if use else 0)
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ("default", "llama3", "linear"):
                raise ConfigError(
                    f"{self.source}: rope_scaling type {kind!r} is not supported (supported: llama3, linear)")

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
        if isinstance(params, dict):
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
