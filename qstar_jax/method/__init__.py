"""Quiet-STaR itself: thought attention, the rollout (base pass, think, talk), the loss, sampling, NTP."""
