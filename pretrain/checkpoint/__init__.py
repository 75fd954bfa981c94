"""Checkpoints: atomic sharded saves and resume (`checkpointer`), who writes and moves
which file (`ranks`), and the object-store mirror (`mirror`)."""
