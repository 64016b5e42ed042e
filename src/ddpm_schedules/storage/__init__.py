"""Files: atomic, checksummed writes and fingerprints, memory-mapped arrays, resumable partial sums. Imports no other
folder."""
