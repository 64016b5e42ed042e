"""Samplers along a schedule (ancestral, DDIM, DPM-Solver++), sample quality and Fréchet features. Imports schedules/
and below."""
