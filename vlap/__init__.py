"""The layer above the stages: the Prefect flow and the `vlap` command."""
