"""The text side: tokenizer, streaming detokenizer, chat template, sampling and stop strings."""
