"""The toy reasoning task: its corpus, its evaluation and the studies run on it."""
