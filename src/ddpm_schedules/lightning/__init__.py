"""Lightning pieces: the training module, data modules and the schedule-monitoring callback."""
