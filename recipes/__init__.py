"""Fiddle recipe factories for distill_llm (installed as `distill_llm.recipes`).

- `models`: published architectures (Llama 3.1 8B, Llama 3.2 1B/3B, Qwen2.5 0.5B/1.5B/7B,
  Qwen3 4B, Mistral 7B; the mixtures of experts Qwen3-30B-A3B and Mixtral 8x7B) and tiny
  CPU-sized ones (dense and MoE), as `run.Config[ModelConfig]`.
- `training`: the KD loss, optimizer and schedule, training length and batches, parallel layout.
- `data`: the data module (weighted prefixes or mock data).
- one module per complete recipe (`run.Partial` of `distill`, `pretrain` or `cache_teacher`):
  `tiny`, `tiny_teacher`, `tiny_cache`, `llama31_8b_to_llama32_1b`, `qwen25_7b_to_qwen25_1p5b`,
  `nemo_to_nemo` (NeMo teacher and student files in, a NeMo file out); MoE teachers into dense
  students: `tiny_moe` (its module also holds the `tiny_moe_teacher` pretrain recipe),
  `qwen3_30b_a3b_to_qwen3_4b`, `mixtral_8x7b_to_mistral_7b`; a student pruned from the tiny
  teacher (`run.Partial` of `prune`): `tiny_prune`; Minitron's prune-then-distil of Llama 3.1
  8B to 4B-Width, two tasks of one experiment (`tasks()`, `launch()`, or `python -m`):
  `llama31_8b_prune_distill_4b` (its `recipe` is the distill task, `prune_recipe` the other).

Factories only build configs: no training, no I/O at import.
"""

RECIPES = (
    "tiny",
    "tiny_teacher",
    "tiny_cache",
    "llama31_8b_to_llama32_1b",
    "qwen25_7b_to_qwen25_1p5b",
    "nemo_to_nemo",
    "tiny_moe",
    "qwen3_30b_a3b_to_qwen3_4b",
    "mixtral_8x7b_to_mistral_7b",
    "tiny_prune",
    "llama31_8b_prune_distill_4b",
)
