"""From predictions to numbers: continual-learning metrics, significance, verdicts, the gate."""
