"""What ships: a stage's checkpoint exported as the files a user deploys (`lorawatch export`), each checked against
the checkpoint it came from before it is declared written. merge.py: the merged Hugging Face folder; gguf.py: GGUF
files through llama.cpp's own converter, quantizer and runtime; agreement.py: how an exported form is compared with
its checkpoint; card.py: the model card; export.py: the command's plan, refusals and order of work. `lorawatch deploy`:
deployed.py evaluates every checkpoint of a finished run in each GGUF format through llama.cpp (runtime.py: greedy on
token ids); formats.py names the GGUF types (light, for the config)."""
