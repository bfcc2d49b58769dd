"""Rebuild a Hugging Face `tokenizers.Tokenizer` from the tokenizer metadata of a GGUF file.

A GGUF file carries its vocabulary as `tokenizer.ggml.*` keys, not as a tokenizer.json. We turn those
keys into an equivalent `tokenizers` pipeline that encodes like llama.cpp (llama-vocab.cpp, as vendored
by llama-cpp-python 0.3.36):

- "gpt2": byte-level BPE. `tokenizer.ggml.pre` picks the regexes that split text before BPE.
- "llama": SentencePiece-style BPE over "▁"-escaped text, with `<0xXX>` byte fallback. GGUF stores
  scores instead of merges, so merges are derived from the vocabulary as HF's SentencePiece converter does.

Encode with `tok.encode(text, add_special_tokens=True)` to get llama.cpp's `tokenize(..., add_bos=True,
special=True)`: BOS/EOS follow the metadata, and special-token text such as "<|im_start|>" maps to its id.
"""

from __future__ import annotations

import warnings
from array import array
from collections.abc import Mapping

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from engine.errors import ModelFormatError

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
# llama.cpp's spelling of Llama-3's "(?i:'s|'t|...)" contractions; same matches
LLAMA3_REGEX = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen2/Qwen3 (and StableLM2): Llama-3's split, but digits one by one
QWEN2_REGEX = LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")
# llama.cpp's fallback for a missing `pre`. It is NOT the GPT-2 regex alone: punctuation runs and
# digit runs are cut out first, and digit runs are then cut into groups of three from the left.
DEFAULT_REGEXES = [r"[\p{P}\$\+<=>\^~\|]+", GPT2_REGEX, r"\p{N}+", r"[0-9][0-9][0-9]"]

# tokenizer.ggml.pre -> regexes applied one after the other, each one splitting the pieces left by the
# previous one and keeping unmatched text as pieces (llama-vocab.cpp, llm_tokenizer_bpe; unicode.cpp).
_DIGITS_THEN_GPT2 = [r"\p{N}", GPT2_REGEX]  # digits one by one (HF SmolLM2: Digits(individual_digits))
PRE_REGEXES: dict[str, list[str]] = {
    "default": DEFAULT_REGEXES,
    # llama.cpp knows only "gpt-2"; "gpt2" is accepted as the obvious misspelling
    "gpt-2": [GPT2_REGEX], "gpt2": [GPT2_REGEX], "mpt": [GPT2_REGEX], "olmo": [GPT2_REGEX],
    "smollm": _DIGITS_THEN_GPT2, "starcoder": _DIGITS_THEN_GPT2, "refact": _DIGITS_THEN_GPT2,
    "codeshell": _DIGITS_THEN_GPT2, "command-r": _DIGITS_THEN_GPT2,
    "llama3": [LLAMA3_REGEX], "llama-v3": [LLAMA3_REGEX], "llama-bpe": [LLAMA3_REGEX],
    "qwen2": [QWEN2_REGEX], "stablelm2": [QWEN2_REGEX],
}
# Llama-3 vocabularies: a word found whole in the vocab is one token, merges or not (llama.cpp
# ignore_merges; HF BPE ignore_merges). llama.cpp also adds BOS for them unless the file says no.
LLAMA3_PRES = {"llama3", "llama-v3", "llama-bpe"}

# llama.cpp's ids when the file names none (llama_vocab::impl::load); 11 is a GPT-2/Falcon relic
DEFAULT_SPECIAL_IDS = {"llama": {"bos": 1, "eos": 2, "unknown": 0}, "gpt2": {"bos": 11, "eos": 11}}


def tokenizer_from_gguf(meta: Mapping[str, object], source: str) -> Tokenizer:
    """Build the tokenizer described by GGUF `meta` (key -> value, arrays as list[str] / np.ndarray)."""
    kind = meta.get("tokenizer.ggml.model")
    if kind not in ("gpt2", "llama"):
        raise ModelFormatError(
            f"{source}: tokenizer.ggml.model = {kind if kind is None else repr(kind)} is not supported (pocketinfer reads 'gpt2' and "
            f"'llama' vocabularies); use a Llama-family GGUF, or the model's HF folder with tokenizer.json")
    tokens = _require(meta, "tokenizer.ggml.tokens", source)  # list[str], n_vocab
    n_vocab = len(tokens)
    types = _array(meta, "tokenizer.ggml.token_type", n_vocab, source)  # (n_vocab,) int; 1..6
    if types is None:  # llama.cpp reads a missing type array as all-normal
        types = np.full(n_vocab, NORMAL, dtype=np.int32)
    vocab = {text: i for i, text in enumerate(tokens)}  # a repeated string keeps its last id, as llama.cpp
    if len(vocab) != n_vocab:
        warnings.warn(f"{source}: tokenizer.ggml.tokens repeats {n_vocab - len(vocab)} string(s); "
                      f"the earlier ids of a repeated string are never produced and decode to nothing", stacklevel=2)

    tok = (_byte_level_bpe(meta, tokens, vocab, source) if kind == "gpt2"
           else _sentencepiece_bpe(meta, tokens, vocab, source))

    # Control and unknown tokens are what llama.cpp matches in text when special=True; user-defined
    # ones it matches always. Matching the raw text (normalized=False) keeps "<|im_start|>" whole.
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                            for i in np.flatnonzero((types == CONTROL) | (types == UNKNOWN)) if tokens[i]])
    tok.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                    for i in np.flatnonzero(types == USER_DEFINED) if tokens[i]])

    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    bos = _special_id(meta, "bos", kind, n_vocab, source) if gguf_add_bos(meta) else None
    eos = _special_id(meta, "eos", kind, n_vocab, source) if add_eos else None
    tok.post_processor = _bos_eos_processor(tokens, bos, eos)
    return tok


def gguf_add_bos(meta: Mapping[str, object]) -> bool:
    """Whether encoding adds BOS: tokenizer.ggml.add_bos_token, else llama.cpp's default for the vocab.

    The default is yes for SentencePiece ("llama") and Llama-3 style BPE, no for other BPE vocabs.
    """
    if "tokenizer.ggml.add_bos_token" in meta:
        return bool(meta["tokenizer.ggml.add_bos_token"])
    return meta.get("tokenizer.ggml.model") == "llama" or meta.get("tokenizer.ggml.pre") in LLAMA3_PRES


def _byte_level_bpe(meta, tokens, vocab, source) -> Tokenizer:
    """GPT-2 style: split by the pre-type's regexes, map bytes to printable chars, then ranked merges."""
    # rank = index; a merge whose pieces or result are not tokens can never fire in llama.cpp, and
    # HF's BPE refuses it, so it is dropped
    merges = [(a, b) for a, b in map(_split_merge, _require(meta, "tokenizer.ggml.merges", source))
              if a in vocab and b in vocab and a + b in vocab]
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_REGEXES:
        # llama.cpp falls back only when the key is absent and refuses unknown names; we load the file
        # (as the project chose) but say so, since the split may not be the one the model was trained on
        warnings.warn(f"{source}: tokenizer.ggml.pre = {pre!r} is unknown to pocketinfer; splitting text with "
                      f"llama.cpp's 'default' regexes, so tokens may differ from the model's own tokenizer",
                      stacklevel=3)
        pre = "default"
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=pre in LLAMA3_PRES))
    splits = [pre_tokenizers.Split(Regex(rx), behavior="isolated") for rx in PRE_REGEXES[pre]]
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        splits + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece_bpe(meta, tokens, vocab, source) -> Tokenizer:
    """SentencePiece style: spaces become "▁", a "▁" dummy prefix starts each text run, BPE by score."""
    scores = _array(meta, "tokenizer.ggml.scores", len(tokens), source)  # (n_vocab,) float32
    if scores is None:
        raise ModelFormatError(
            f"{source}: tokenizer.ggml.scores is missing for a 'llama' (SentencePiece) vocabulary, so merge "
            f"order is unknown; re-convert the model with llama.cpp's convert_hf_to_gguf.py")
    unk_id = _special_id(meta, "unknown", "llama", len(tokens), source)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=_merges_from_scores(tokens, vocab, scores),
                               unk_token=tokens[unk_id], fuse_unk=True, byte_fallback=True))
    # llama.cpp prepends " " to every text run that starts the input or follows a special token, even
    # when the run already starts with a space. A normalizer runs once per run between added tokens,
    # so Prepend does exactly that (the Metaspace pre-tokenizer would skip runs starting with "▁").
    space_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    escape = [normalizers.Replace(" ", "▁")]
    tok.normalizer = normalizers.Sequence(([normalizers.Prepend("▁")] if space_prefix else []) + escape)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if space_prefix else []))
    return tok


def _merges_from_scores(tokens, vocab, scores) -> list[tuple[str, str]]:
    """Every split of a piece into two vocab pieces is a merge, ranked by the piece's score (higher first).

    llama.cpp's SentencePiece tokenizer repeatedly joins the adjacent pair whose concatenation is in the
    vocab with the highest score; BPE with these ranks makes the same choices.
    """
    # Only (piece id, split point) pairs are kept while ranking: tuples of strings and floats for every
    # candidate cost ~250 bytes each, some 120 MiB of peak on Gemma's 262144-piece vocabulary.
    ids, cuts = array("i"), array("i")
    for tid, piece in enumerate(tokens):
        for k in range(1, len(piece)):
            if piece[:k] in vocab and piece[k:] in vocab:
                ids.append(tid)
                cuts.append(k)
    ids_np, cuts_np = np.frombuffer(ids, np.int32), np.frombuffer(cuts, np.int32)
    order = np.lexsort((cuts_np, ids_np, -np.asarray(scores, np.float64)[ids_np]))   # score desc, id, split
    return [(tokens[t][:k], tokens[t][k:]) for t, k in zip(ids_np[order].tolist(), cuts_np[order].tolist())]


def _bos_eos_processor(tokens, bos: int | None, eos: int | None):
    """Template that adds BOS/EOS around each sequence; None when neither is wanted."""
    if bos is None and eos is None:
        return None
    head = [tokens[bos]] if bos is not None else []
    tail = [tokens[eos]] if eos is not None else []
    single = head + ["$A:0"] + tail
    pair = single + head + ["$B:1"] + tail
    specials = [(tokens[i], i) for i in {bos, eos} - {None}]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


def _split_merge(merge: str) -> tuple[str, str]:
    # llama.cpp splits at the first space after the first char, so a merge may start with " "
    cut = merge.find(" ", 1)
    return (merge[:cut], merge[cut + 1:]) if cut > 0 else ("", "")


def _special_id(meta, name: str, kind: str, n_vocab: int, source: str) -> int:
    key = f"tokenizer.ggml.{name}_token_id"
    default = DEFAULT_SPECIAL_IDS[kind].get(name)
    value = meta.get(key, default)
    if value is not None and not 0 <= int(value) < n_vocab:
        warnings.warn(f"{source}: {key} = {value} is outside the vocabulary (size {n_vocab}); "
                      f"using llama.cpp's default {default}", stacklevel=3)
        value = default
    if value is None or not 0 <= int(value) < n_vocab:
        raise ModelFormatError(
            f"{source}: {key} = {value} does not name a token of the {n_vocab}-token vocabulary, but the "
            f"metadata asks for it; fix the key (e.g. with gguf's gguf_set_metadata.py) or re-convert the model")
    return int(value)


def _require(meta, key: str, source: str):
    value = meta.get(key)
    if value is None or len(value) == 0:
        raise ModelFormatError(
            f"{source}: GGUF key {key} is missing or empty, so the tokenizer cannot be rebuilt; "
            f"re-convert the model with llama.cpp's convert_hf_to_gguf.py, or load its HF folder instead")
    return value


def _array(meta, key: str, n_vocab: int, source: str) -> np.ndarray | None:
    """A per-token numeric array (n_vocab,), or None when absent; a length mismatch is a broken file."""
    value = meta.get(key)
    if value is None:
        return None
    value = np.asarray(value)
    if value.shape != (n_vocab,):
        raise ModelFormatError(
            f"{source}: {key} has shape {value.shape} but tokenizer.ggml.tokens has {n_vocab} entries; "
            f"the file is truncated or badly converted: re-download or re-convert it")
    return value
