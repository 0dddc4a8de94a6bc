"""PrunedLoRA: train an over-parameterised LoRA adapter and prune its rank (design §1.2)."""
