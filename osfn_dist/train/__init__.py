"""Training: config, run directory, the single-process loop and (with the ray extra) Ray Train."""
