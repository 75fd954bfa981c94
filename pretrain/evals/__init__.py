"""Downstream evaluation: in-context-learning tasks (multiple choice, cloze) scored by the
training ranks during training or on a checkpoint (`pretrain eval`), and an adapter that
lets lm-evaluation-harness score our checkpoints (`harness`)."""
