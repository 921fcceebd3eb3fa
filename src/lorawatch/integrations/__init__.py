"""lorawatch inside other tools: experiment trackers and the transformers Trainer callback."""
