"""AtmoRep-style masked token models: configuration, tokens, masking, network, data and training.

This package imports torch but never Prefect, and touches MLflow only in `models.tracking`.
"""
