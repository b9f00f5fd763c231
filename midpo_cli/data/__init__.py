"""Preference data: the built-in task, local/hub files, tokenisation and batching."""
