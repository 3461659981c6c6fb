"""Model files: any model path (our checkpoints, Hugging Face directories) to a ModelConfig and
weights (`paths`), and the Hugging Face layout in and out (`hf`)."""
