"""Router, routing strategies, the ensemble that behaves as one expert, and the DDM sampling pipeline."""
