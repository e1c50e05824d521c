"""Evaluation above both methods: FID with the shipped digit classifier, and video metrics."""
