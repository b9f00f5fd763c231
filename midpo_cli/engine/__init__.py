"""The training engine: log-prob computation, the reference side, the loop, evaluation."""
