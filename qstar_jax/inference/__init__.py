"""Inference: KV-cache decoding with thoughts, generation, evaluation tasks, analysis."""
