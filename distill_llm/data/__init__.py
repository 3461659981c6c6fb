"""Data: corpus readers (`corpus`), tokenizers (`tokenizer`), tokenizing a corpus into
megatron's .bin/.idx (`preprocess`), and the datasets and batch plan a run trains on
(`datasets`)."""
