"""pocketinfer runtime: readers, tokenizer, layer stack, KV cache, sampling, generation API and CLI.

    import engine
    llm = engine.load("smollm2-135m-instruct")
    print(llm.generate("Why is the sky blue?", max_tokens=64).text)
"""


def load(source="smollm2-135m-instruct", **kwargs):
    """See engine.loader.load (imported lazily so `pocketinfer --help` starts fast)."""
    from engine.loader import load as _load

    return _load(source, **kwargs)


__all__ = ["load"]
