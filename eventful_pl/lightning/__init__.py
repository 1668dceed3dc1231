"""LightningModules, evaluation sweeps and callbacks for eventful models."""
