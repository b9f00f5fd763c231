"""Tasks: where a run's reference policy, preference pairs and true-reward evaluation come from."""
