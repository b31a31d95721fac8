"""Lightning + Hydra applications built on deepagg (the only code that imports lightning, hydra, torchmetrics)."""
