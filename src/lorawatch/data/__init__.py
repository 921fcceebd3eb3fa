"""What a run reads: tasks, prompts, inputs, and fetching the paper's data."""
