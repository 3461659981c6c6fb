"""Where a student can start: Minitron-style structured pruning of a teacher. The pruned shape
(`shape`: a target shape, or a parameter budget), importance from calibration batches
(`importance`), the units kept (`plan`), the teacher's tensors cut to them (`slicing`), and the
pruned checkpoint with its prune.json record (`output`)."""
