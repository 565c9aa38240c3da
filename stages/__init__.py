"""The pipeline's stages (one module each; stages.graph lists them). Importing the package pins torch's
CPU kernels before any stage computes (pipeline.runtime.pin_cpu_kernels)."""
from pipeline.runtime import pin_cpu_kernels

pin_cpu_kernels()
