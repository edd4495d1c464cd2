"""Training: the Hydra entry point, the DeepSpeed engine around megatron-core experts, checkpoints, monitoring."""
