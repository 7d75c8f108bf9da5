"""Anti-forgetting methods, each a per-stage recipe option: self-distillation, LoRA, HFT, L2-to-init, freezing."""
