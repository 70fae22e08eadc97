"""Checkpoint formats in and out: Hugging Face directories, GGUF files, and dense-to-MoE upcycling.

Compatibility shims (key renames, fused vs per-expert expert layouts) live here, never in the model.
"""
