"""Training the tiny model (DESIGN 3.4): `python -m model.train.recipe`."""
