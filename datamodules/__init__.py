"""LightningDataModules for the paper's datasets, read in their published layouts."""
