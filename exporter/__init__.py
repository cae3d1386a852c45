"""Export pipeline: load, wrap with a static KV cache, capture, lower per target, verify, write."""
