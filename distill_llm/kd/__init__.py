"""What the student learns: the KD settings (`config`), the divergences (`losses`), the one KD
criterion (`criterion`), the student+teacher wrapper (`wrapper`), and offline teacher logits
(`teacher_cache` format, `offline` pass)."""
