"""Partitioning: feature extraction, clustering into K islands, and the manifest that records them."""
