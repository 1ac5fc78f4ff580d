"""Ready-to-train tasks: each wires data, a model, the trainer and metrics together."""
