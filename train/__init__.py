"""Step 3: training loop helpers, checkpoints and the MLM evaluation shared with step 4."""
