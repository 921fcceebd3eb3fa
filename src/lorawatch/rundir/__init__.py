"""The run folder: its typed records, reading and writing them, its life cycle, a stage's files."""
