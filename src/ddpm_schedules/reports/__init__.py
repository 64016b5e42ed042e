"""Presentation: results tables, figures, sample grids and logger output; estimates nothing. Imports costs/ and
below."""
