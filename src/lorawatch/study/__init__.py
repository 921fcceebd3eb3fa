"""Studies: a grid of runs from one STUDY.yaml, its driver, and the Ray backend."""
