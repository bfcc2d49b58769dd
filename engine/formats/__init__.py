"""Model sources: the registry, GGUF and Hugging Face readers, deploy directories, and the name maps that assemble their tensors into the model's weights."""
