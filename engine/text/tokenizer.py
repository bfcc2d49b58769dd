"""The tokenizer users see: encode/decode over a `tokenizers.Tokenizer`, BOS policy, EOS ids and the
chat template, built from an HF directory or from GGUF metadata."""

from __future__ import annotations

from pathlib import Path

from engine.errors import ModelFormatError
from engine.text.chat_template import render


class Tokenizer:
    def __init__(self, tk, *, bos_token_id: int | None, eos_token_ids: tuple[int, ...], add_bos: bool | None,
                 chat_template: str | None, source: str):
        self._tk = tk
        self.bos_token_id = bos_token_id
        self.eos_token_ids = tuple(dict.fromkeys(i for i in eos_token_ids if i is not None))
        self.add_bos = add_bos
        self.chat_template = chat_template
        self.source = source
        self.bos_token = tk.id_to_token(bos_token_id) if bos_token_id is not None else ""
        eos0 = self.eos_token_ids[0] if self.eos_token_ids else None
        self.eos_token = tk.id_to_token(eos0) if eos0 is not None else ""

    @property
    def vocab_size(self) -> int:
        return self._tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Special tokens written in the text (e.g. <|im_start|>) map to their ids; BOS is prepended
        only when the model asks for it."""
        ids = self._tk.encode(text, add_special_tokens=True).ids
        if self.add_bos and self.bos_token_id is not None and ids[:1] != [self.bos_token_id]:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self._tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tk.token_to_id(token)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        text = render(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                      bos_token=self.bos_token, eos_token=self.eos_token)
        # Templates that write {{ bos_token }} themselves would get a second BOS from encode().
        if self.add_bos and self.bos_token and text.startswith(self.bos_token):
            text = text[len(self.bos_token):]
        return text


def _token_str(v) -> str | None:
    if isinstance(v, dict):
        return v.get("content")
    return v


def from_hf_dir(directory: Path, eos_ids: tuple[int, ...], bos_id: int | None) -> Tokenizer:
    import tokenizers

    from engine.formats.hf_loader import read_json

    path = directory / "tokenizer.json"
    if not path.exists():
        raise ModelFormatError(f"{path}: file not found; pocketinfer needs the fast-tokenizer file tokenizer.json")
    try:
        tk = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception subclass for malformed files
        raise ModelFormatError(f"{path}: cannot be read by tokenizers ({e}); re-download it") from None
    cfg = read_json(directory / "tokenizer_config.json", required=False)
    template = cfg.get("chat_template")
    if isinstance(template, list):  # several named templates: take the default one
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    jinja_file = directory / "chat_template.jinja"
    if template is None and jinja_file.exists():
        template = jinja_file.read_text(encoding="utf-8")
    bos = _token_str(cfg.get("bos_token"))
    eos = _token_str(cfg.get("eos_token"))
    bos_id = tk.token_to_id(bos) if bos else bos_id
    eos_extra = (tk.token_to_id(eos),) if eos else ()
    return Tokenizer(tk, bos_token_id=bos_id, eos_token_ids=tuple(eos_ids) + eos_extra,
                     add_bos=cfg.get("add_bos_token"), chat_template=template, source=str(path))


END_OF_TURN_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>",
                     "<EOT>", "<|end_of_text|>", "<end_of_utterance>")


def from_gguf(meta: dict, source: str) -> Tokenizer:
    from engine.text.gguf_tokenizer import gguf_add_bos, tokenizer_from_gguf

    tk = tokenizer_from_gguf(meta, source)
    eos = [meta.get(k) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                                  "tokenizer.ggml.eom_token_id")]
    # llama.cpp also ends generation at the end-of-turn tokens it knows by their text (Gemma's
    # <end_of_turn> is in no metadata key)
    eos += [tk.token_to_id(t) for t in END_OF_TURN_TEXTS]
    # The GGUF tokenizer's post-processor already adds BOS when the metadata (or llama.cpp's default for
    # that vocabulary) asks for it; add_bos here only informs chat-template and perplexity handling.
    add_bos = gguf_add_bos(meta)
    return Tokenizer(tk, bos_token_id=_int(meta.get("tokenizer.ggml.bos_token_id")),
                     eos_token_ids=tuple(_int(e) for e in eos if e is not None), add_bos=add_bos,
                     chat_template=meta.get("tokenizer.chat_template"), source=source)


def _int(v):
    return None if v is None else int(v)
