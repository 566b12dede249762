"""Checkpoint I/O: safetensors reading/validation and conversion to sharded orbax checkpoints."""
