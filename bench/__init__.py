"""Benchmarks: each prints one JSON object and appends it to bench/results.jsonl."""
