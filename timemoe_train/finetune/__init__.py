"""A pretrained Time-MoE + the user's series -> a fine-tuned model and a before/after report (`timemoe-finetune`)."""
