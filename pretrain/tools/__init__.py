"""Commands that read a run or a checkpoint: consolidate, export, generate, plot, plan."""
