"""The layer above the stages: the Prefect flow and the `vlap` command. Importing the package pins
torch's CPU kernels before anything computes (pipeline.runtime.pin_cpu_kernels)."""
from pipeline.runtime import pin_cpu_kernels

pin_cpu_kernels()
