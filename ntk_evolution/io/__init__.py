"""Files: checkpoint and kernel files and their names (checkpoints), what each file kind must
hold, checked after the safe unpickle (schemas)."""
