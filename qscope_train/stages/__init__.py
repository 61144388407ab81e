"""One module per pipeline stage, each entered as run(cfg, dirs, accelerator, tracker); pipeline.run calls
them in the order of config.Stage."""
