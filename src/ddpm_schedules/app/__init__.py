"""The entry points' wiring: typed settings, the run's stages, train/evaluate, the CLI and the export command. Imports
every other folder."""
