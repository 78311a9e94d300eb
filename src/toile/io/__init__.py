"""Safe file loading (safetensors only), format checks and hashing."""
