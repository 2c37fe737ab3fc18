"""Training helpers: datasets and data loaders for qbackprop experiments."""
