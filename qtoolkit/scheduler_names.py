"""The samplers qtoolkit draws with, by name: diffusers scheduler classes (qtoolkit.sampling makes them).

Apart from sampling so that the command line lists them without importing torch. Foundation layer: imports
nothing.
"""

SCHEDULER_CLASSES = {"ddpm": "DDPMScheduler", "ddim": "DDIMScheduler", "dpm-solver": "DPMSolverMultistepScheduler"}
