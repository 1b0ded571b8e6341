"""Post-processing of experiment results: routing plots and the architecture diagram."""
