"""The model: config, weight layouts, the layer stack and its forward pass, KV cache, RoPE tables."""
