"""Pair costs: the ELBO terms, the ELBO / MSE / ODE matrix estimators, held-out bits/dim, grids, refinement and
precision rounds. Imports sampling/ and below."""
