"""Research tools: the feature store for training and benchmarks, simulation, training, evaluation."""
