"""Networks, checkpoint loading and the diffusion parameterisation."""
