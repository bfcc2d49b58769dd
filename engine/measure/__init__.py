"""Measurements the CLI and tools report: benchmark protocol, perplexity, sparse decode against dense."""
