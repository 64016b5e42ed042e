"""The model and its conventions: the noise schedule and the paper's formulas, DiffusionModel, pair tables, the UNet,
the noise rule and the loaders. Imports storage/."""
