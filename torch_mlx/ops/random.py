"""Random ops, drawn from the 'mlx' generator so torch.manual_seed reproduces them."""
