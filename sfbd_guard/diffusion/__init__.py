"""Pure diffusion core: EDM preconditioning, loss, U-Net, EMA, optimiser helpers, samplers."""
